"""``convret mine``: hard negatives for a training file, sampled from a rank window of a retriever's ranking.

ChatRetriever's recipe (appendix A.3): for each training turn, retrieve from a corpus with the turn's rewrite and
sample the negatives from ranks 15 to 30. ``convret mine`` does that for any training file ``convret train``
reads (UltraChat-style, Tevatron, QReCC / TopiOCQA-style triplets) and writes the same file back, in the same
format, with every example's negatives replaced by the mined ones.

Retrievers (``--retriever``):

- a convret checkpoint (a directory with ``convret_config.json``): passages and sessions are formatted and
  embedded exactly as ``convret encode`` does (:class:`~convret.retrieval.encoder.Encoder`,
  :func:`~convret.retrieval.encode.encode_stream`), an exact inner-product index
  (:func:`~convret.retrieval.index.build_index`) and :func:`~convret.retrieval.search.search_index`;
- a sentence-transformers model directory (``modules.json``): ``encode_document`` / ``encode_query`` (normalised
  when its similarity is cosine), the same embedding directory, index and search;
- ``bm25``: BM25 (``bm25s``, Lucene variant, English stop words), for when no dense model exists yet.

The ranking is score-descending with equal scores ordered by docid (as ``convret search``). For each example:

1. the query is the rewrite when the example has one (``--query auto``, the default), the rewrite always
   (``rewrite``: an example without one is an error) or the session (``session``);
2. the candidates are the passages at ranks ``LO..HI`` (1-based, inclusive; ``--window 15-30``) among those the
   retriever retrieved (``bm25``: a score above 0; a passage sharing no term with the query is never drawn);
3. a candidate is dropped when it is one of the example's positives: the same id, or the same text (compared by
   a 64-bit hash of the stripped text, see below);
4. with ``--max-positive-ratio F``, a candidate is also dropped when its score exceeds ``F`` times the
   positive's score (the false-negative filter of positive-aware mining, NV-Retriever's "TopK-PercPos": a
   passage the retriever scores nearly as high as the gold one is often an unlabelled positive; 0.95 is the
   usual value; meant for positive scores > 0; with several positives, the first one's score);
5. ``--num-negatives`` of the remaining candidates are drawn without replacement with a generator seeded by
   ``(--seed, the example's position in the file, its id)``: the draw of one example does not depend on any
   other, so a resumed run draws the same.

Every positive of the input is written back (a Tevatron query with several ``positive_passages`` keeps them all).

Memory. The dense retrievers never hold the corpus texts: the collection is read line by line (the readers of
``convret.data``) and embedded shard by shard as ``convret encode`` does, the index is built from the
memory-mapped shards, and the ranking works on row numbers. What stays in memory for the run is the index (an
exact float32 Flat index: 4 x dim bytes a passage), the list of passage ids, and one 64-bit hash a passage of its
stripped text (``WORK/text_hashes.npy``, memory-mapped, row-aligned with the index, computed in the same pass that
embeds): the "same text as the positive" filter compares hashes (a false match needs a 64-bit collision). The
chosen negatives are recorded by id; the texts the output needs are fetched at the end in one more streaming pass
that keeps only those ids. A Tevatron file in the new schema (document ids only) is resolved the same way: one
pass over the collection keeps the passages its ids name. BM25 is different: ``bm25s`` tokenises the whole corpus
in memory (the texts are held while indexing) and searches an in-memory sparse index; the index is saved in the
work directory and loaded back memory-mapped (``bm25s.BM25.load(mmap=True)``), so a rerun does not index again.

Resumable and atomic like ``convret encode``: everything goes into a work directory (``OUTPUT.work/`` by
default): the corpus embeddings (shards kept across reruns), the text hashes, the index, and the chosen negative
ids in chunks of ``--chunk-size`` records, each written atomically. A rerun with the same settings keeps what is
complete; the output file is written atomically at the end, then the work directory is deleted (``--keep-work``
keeps it).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .._args import parse
from .._io import atomic_write
from ..data.records import ASSISTANT, USER, Passage, TrainingExample, Turn
from ..provenance import check_output, content_identity
from . import _data
from .ids import read_ids, write_ids
from .search import id_ranks

__all__ = ["MineSettings", "mine", "mine_examples", "choose_negatives", "make_retriever", "parse_window", "query_of",
           "rank_scores", "text_hash", "BM25Retriever", "DenseRetriever", "main"]

logger = logging.getLogger("convret.mine")

DEFAULT_WINDOW = (15, 30)
DEFAULT_CHUNK_SIZE = 500
QUERY_MODES = ("auto", "rewrite", "session")


@dataclass(frozen=True)
class MineSettings:
    """What decides the mined negatives (a work directory is reused only with the same settings)."""

    window: tuple[int, int] = DEFAULT_WINDOW
    num_negatives: int = 4
    seed: int = 0
    query: str = "auto"
    max_positive_ratio: float | None = None

    def __post_init__(self) -> None:
        lo, hi = self.window
        if not 1 <= lo <= hi:
            raise ValueError(f"window {lo}-{hi}: ranks start at 1 and LO <= HI")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be positive, got {self.num_negatives}")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}")
        if self.max_positive_ratio is not None and not self.max_positive_ratio > 0:
            raise ValueError(f"max_positive_ratio must be positive, got {self.max_positive_ratio}")


def parse_window(text: str) -> tuple[int, int]:
    """``"15-30"`` -> ``(15, 30)``."""
    try:
        lo, hi = (int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"window {text!r}: expected LO-HI, e.g. 15-30") from None
    MineSettings(window=(lo, hi))
    return lo, hi


def query_of(example: TrainingExample, mode: str) -> tuple[list[Turn], str]:
    """``(history, query)`` to retrieve with: ``([], rewrite)`` or the session."""
    if mode == "rewrite" or (mode == "auto" and example.rewrite):
        if not example.rewrite:
            raise ValueError(f"example {example.id} has no rewrite (--query rewrite); use --query auto or session")
        return [], example.rewrite
    return list(example.history), example.query


def _flat_query(history: Sequence[Turn], query: str) -> str:
    """A session as one text for the text-only retrievers: its user turns and the query, one per line."""
    return "\n".join([*(t.text for t in history if t.role == USER), query])


def _passage_text(passage: Passage) -> str:
    return f"{passage.title} {passage.text}" if passage.title else passage.text


def text_hash(text: str) -> int:
    """A 64-bit hash (blake2b) of ``text.strip()``: what the "same text as the positive" filter compares."""
    return int.from_bytes(hashlib.blake2b(text.strip().encode("utf-8"), digest_size=8).digest(), "little")


def _text_hashes(passages: Sequence[Passage]) -> np.ndarray:
    return np.fromiter((text_hash(p.text) for p in passages), dtype=np.uint64, count=len(passages))


def _hashing_records(passages: Iterable[Passage], hashes: array) -> Iterator[tuple[str, Passage]]:
    """``(id, passage)`` of streamed ``passages``, appending each passage's :func:`text_hash` to ``hashes``."""
    for passage in passages:
        hashes.append(text_hash(passage.text))
        yield passage.id, passage


def _save_hashes(path: Path, hashes: array) -> None:
    with atomic_write(path, "wb", encoding=None) as handle:
        np.save(handle, np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, np.uint64))


def rank_scores(scores: np.ndarray, depth: int, id_rank: np.ndarray) -> np.ndarray:
    """Indices of the (at most) ``depth`` best passages the retriever retrieved for one query, score descending,
    ties by ``id_rank`` ascending (the docid order). Retrieved: a score > 0 (BM25 scores a passage sharing no
    term with the query 0; it was not retrieved, and is never a candidate). Only the retrieved passages are
    selected from, and only the ``depth`` best of them (and those tied with the last) are sorted."""
    retrieved = np.flatnonzero(scores > 0)
    hits = scores[retrieved]
    if len(retrieved) > depth:
        kth = np.partition(-hits, depth - 1)[depth - 1]
        keep = -hits <= kth  # the depth best and every passage tied with the last of them
        retrieved, hits = retrieved[keep], hits[keep]
    order = np.lexsort((id_rank[retrieved], -hits))[:depth]
    return retrieved[order]


# ------------------------------------------------------------------------------------------ retrievers
class BM25Retriever:
    """BM25 over the corpus with ``bm25s`` (title and text; lower-cased, English stop words removed).

    Not streaming: ``bm25s`` tokenises the whole corpus in memory (the texts are held while indexing) and scores
    against an in-memory sparse index. The index is saved to ``WORK/bm25`` and loaded back memory-mapped, so a
    rerun reuses it and the run holds the sparse matrix as file-backed pages."""

    name = "bm25"

    def __init__(self) -> None:
        try:
            import bm25s  # noqa: F401
        except ImportError as error:
            raise ValueError("--retriever bm25 needs the bm25s package (pip install bm25s, or "
                             "pip install -e .[retrieval])") from error

    def prepare(self, corpus: str | os.PathLike, work: Path, progress: bool) -> None:
        """Index ``corpus`` (or load the index a previous run saved in ``work``); sets ``ids`` and
        ``text_hashes`` (row-aligned with the index)."""
        import bm25s

        from .._io import atomic_directory

        saved = work / "bm25"
        if not (saved / "ids.txt").is_file():
            ids, texts, hashes = [], [], array("Q")
            for ident, passage in _hashing_records(_data.unique_passages(corpus), hashes):
                ids.append(ident)
                texts.append(_passage_text(passage))
            bm25 = bm25s.BM25()
            bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=progress), show_progress=progress)
            del texts
            with atomic_directory(saved, overwrite=True) as tmp:
                bm25.save(str(tmp), show_progress=False)
                _save_hashes(tmp / "text_hashes.npy", hashes)
                write_ids(tmp / "ids.txt", ids)
            del bm25, ids, hashes
        self.bm25 = bm25s.BM25.load(str(saved), mmap=True, show_progress=False, verbosity=0)
        self.text_hashes = np.load(saved / "text_hashes.npy", mmap_mode="r")
        self.ids = read_ids(saved / "ids.txt")
        if len(self.ids) != len(self.text_hashes):
            raise ValueError(f"{saved}: {len(self.ids)} ids for {len(self.text_hashes)} text hashes; pass --restart")
        self.id_rank = id_ranks(self.ids)
        self.row_of_id = {ident: i for i, ident in enumerate(self.ids)}
        self.row_of_hash = {int(h): i for i, h in enumerate(self.text_hashes)}

    def scores(self, text: str) -> np.ndarray:
        """bm25s's scores of every corpus passage for ``text`` (zeros when no token is left)."""
        import bm25s

        tokens = bm25s.tokenize([text], stopwords="en", return_ids=False, show_progress=False)[0]
        if not tokens:
            return np.zeros(len(self.ids), dtype=np.float32)
        return np.asarray(self.bm25.get_scores(tokens))

    def rank(self, queries: Sequence[tuple[list[Turn], str]], positives: Sequence[Passage | None],
             depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        all_scores = np.full((len(queries), depth), -np.inf)
        all_rows = np.full((len(queries), depth), -1, dtype=np.int64)  # -1: fewer passages retrieved than depth
        pos_scores = []
        for j, ((history, query), positive) in enumerate(zip(queries, positives)):
            scores = self.scores(_flat_query(history, query))
            rows = rank_scores(scores, depth, self.id_rank)
            all_rows[j, : len(rows)] = rows
            all_scores[j, : len(rows)] = scores[rows]
            row = None if positive is None else self.row_of_id.get(positive.id,
                                                                   self.row_of_hash.get(text_hash(positive.text)))
            # a positive outside the corpus has no BM25 score under the corpus's statistics
            pos_scores.append(np.nan if row is None else float(scores[row]))
        return all_scores, all_rows, np.asarray(pos_scores, dtype=np.float64)


class _SentenceTransformerEncoder:
    """What ``encode_to_dir`` needs of an encoder, for a sentence-transformers model (items are texts)."""

    def __init__(self, path: str, device: str | None):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device or "cpu")
        self.source = str(path)
        self._texts: list[str] = []
        normalize = str(getattr(self.model, "similarity_fn_name", "") or "").lower() == "cosine"
        self.config = SimpleNamespace(normalize=normalize)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            getattr(self.model, "get_sentence_embedding_dimension", None)
        self.dim = int(get_dim()) if get_dim else int(self.model.encode(["x"]).shape[1])

    def _encode(self, texts: Sequence[str], kind: str) -> np.ndarray:
        method = getattr(self.model, f"encode_{kind}", None) or self.model.encode
        out = method(list(texts), convert_to_numpy=True, normalize_embeddings=self.config.normalize,
                     show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def embed_tokens(self, items: Sequence[Any], progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """``items``: what :meth:`passage_tokens` returned (``encode_to_dir`` stores them as int arrays)."""
        out = self._encode([self._texts[int(np.asarray(item).reshape(-1)[0])] for item in items], "document")
        self._texts.clear()  # encode_stream embeds a shard's items at once: the table restarts with the next shard
        if progress is not None:
            progress(len(items))
        return out

    def passage_tokens(self, passage: Passage) -> list[int]:
        """A one-element "sequence", the passage's row in a text table: ``encode_stream`` moves token ids, a
        sentence-transformers model takes text. The table holds the texts of one shard (cleared by
        :meth:`embed_tokens`)."""
        self._texts.append(_passage_text(passage))
        return [len(self._texts) - 1]

    def queries(self, queries: Sequence[tuple[list[Turn], str]]) -> np.ndarray:
        return self._encode([_flat_query(h, q) for h, q in queries], "query")

    def passages(self, passages: Sequence[Passage]) -> np.ndarray:
        return self._encode([_passage_text(p) for p in passages], "document")


class _ConvretEncoder:
    """A convret checkpoint's :class:`Encoder`, with the query / passage calls the miner makes."""

    def __init__(self, path: str, device: str | None, token_budget: int | None):
        from .encoder import DEFAULT_TOKEN_BUDGET, Encoder

        self.encoder = Encoder.from_checkpoint(path, device=device or "cpu",
                                               token_budget=token_budget or DEFAULT_TOKEN_BUDGET)

    def __getattr__(self, name: str) -> Any:  # source, dim, config, embed_tokens, passage_tokens
        return getattr(self.encoder, name)

    def queries(self, queries: Sequence[tuple[list[Turn], str]]) -> np.ndarray:
        return self.encoder.embed_tokens([self.encoder.session_tokens(h, q) for h, q in queries])

    def passages(self, passages: Sequence[Passage]) -> np.ndarray:
        return self.encoder.embed_tokens([self.encoder.passage_tokens(p) for p in passages])


class DenseRetriever:
    """A dense retriever through convret's encode / index / search code: the corpus embedded into
    ``WORK/corpus`` (resumable shards), an exact inner-product index in ``WORK/index``, queries searched with
    :func:`search_index` (ties by docid)."""

    def __init__(self, encoder: Any, name: str, shard_size: int = 50_000, identity: str | None = None):
        self.encoder = encoder
        self.name = name
        self.shard_size = shard_size
        self.identity = identity  # the model's content identity: a retrained model at the same path differs

    def prepare(self, corpus: str | os.PathLike, work: Path, progress: bool) -> None:
        """Embed ``corpus`` into ``work/corpus`` streaming (shards complete on disk are kept), hash its texts in
        the same pass into ``work/text_hashes.npy``, build the index; sets ``index``, ``ids``, ``text_hashes``.
        No passage text outlives its shard."""
        from .encode import encode_fingerprint, encode_stream
        from .index import build_index, load_index

        corpus_dir, index_dir, hash_path = work / "corpus", work / "index", work / "text_hashes.npy"
        if not (index_dir / "meta.json").is_file() or not hash_path.is_file():
            hashes: array = array("Q")
            records = _hashing_records(_data.iter_collection(corpus), hashes)
            fingerprint = encode_fingerprint(self.encoder, "passages", None, shard_size=self.shard_size)
            encode_stream(self.encoder, records, self.encoder.passage_tokens, corpus_dir, fingerprint,
                          shard_size=self.shard_size, kind="passages", progress=progress, source=str(corpus),
                          fix="pass --restart to mine from scratch (it deletes only what mine wrote), or another "
                              "--work-dir")
            for _ in records:  # an embedding directory already complete is returned without reading the input
                pass
            _save_hashes(hash_path, hashes)
            del hashes
            if not (index_dir / "meta.json").is_file():
                build_index(corpus_dir, index_dir, "Flat", use_gpu=None, overwrite=True)  # mine's own work
        self.index, self.ids, _ = load_index(index_dir)
        self.text_hashes = np.load(hash_path, mmap_mode="r")
        self.id_rank = id_ranks(self.ids)  # once, not at every search
        if len(self.text_hashes) != len(self.ids):
            raise ValueError(f"{work}: {len(self.text_hashes)} text hashes for {len(self.ids)} indexed passages; "
                             "pass --restart")

    def rank(self, queries: Sequence[tuple[list[Turn], str]], positives: Sequence[Passage | None],
             depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from .search import search_index

        vectors = self.encoder.queries(queries)
        scores, rows = search_index(self.index, vectors, depth, ids=self.ids, id_rank=self.id_rank)
        pos_scores = np.full(len(queries), np.nan)
        have = [i for i, p in enumerate(positives) if p is not None]
        if have:
            pos_vectors = self.encoder.passages([positives[i] for i in have])
            pos_scores[have] = np.einsum("nd,nd->n", vectors[have].astype(np.float64),
                                         pos_vectors.astype(np.float64))
        return scores, rows, pos_scores


def make_retriever(spec: str, device: str | None = None, token_budget: int | None = None,
                   shard_size: int = 50_000) -> Any:
    """``"bm25"``, a convret checkpoint directory or a sentence-transformers model directory."""
    if spec.lower() == "bm25":
        return BM25Retriever()
    path = Path(spec)
    if (path / "convret_config.json").is_file():
        return DenseRetriever(_ConvretEncoder(spec, device, token_budget), f"convret:{path}", shard_size,
                              content_identity(path))
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return DenseRetriever(_SentenceTransformerEncoder(spec, device), f"sentence-transformers:{path}",
                              shard_size, content_identity(path))
    raise ValueError(f"--retriever {spec}: not 'bm25', a convret checkpoint (convret_config.json) or a "
                     "sentence-transformers model directory (modules.json)")


# ------------------------------------------------------------------------------------------ sampling
def _positives(example: TrainingExample) -> list[Passage]:
    return list(example.positives) or ([example.positive] if example.positive is not None else [])


def _draw(example: TrainingExample, position: int, ids: Sequence[str], text_hashes: np.ndarray, rows: np.ndarray,
          scores: np.ndarray, positive_score: float, settings: MineSettings) -> tuple[list[int], int]:
    """Corpus rows of the negatives of one example, and how many window candidates the ratio filter dropped."""
    lo, hi = settings.window
    positives = _positives(example)
    positive_ids = {p.id for p in positives}
    positive_hashes = {text_hash(p.text) for p in positives}
    candidates, filtered = [], 0
    for rank in range(lo, min(hi, len(rows)) + 1):
        row, score = int(rows[rank - 1]), float(scores[rank - 1])
        if row < 0:
            continue
        if ids[row] in positive_ids or int(text_hashes[row]) in positive_hashes:
            continue
        if settings.max_positive_ratio is not None and np.isfinite(positive_score) \
                and score > settings.max_positive_ratio * positive_score:
            filtered += 1
            continue
        candidates.append(row)
    rng = random.Random(f"{settings.seed}\x00{position}\x00{example.id}")
    return rng.sample(candidates, min(settings.num_negatives, len(candidates))), filtered


def choose_negatives(examples: Sequence[TrainingExample], positions: Sequence[int], retriever: Any,
                     ids: Sequence[str], text_hashes: np.ndarray, settings: MineSettings
                     ) -> tuple[list[list[int] | None], dict]:
    """The corpus rows of each example's mined negatives (``None`` for an example without a positive), by row
    only: ``ids`` and ``text_hashes`` (:func:`text_hash`) are the corpus's, row-aligned with ``retriever``'s
    ranking. ``stats``: ``filtered`` (window candidates dropped by the ratio filter), ``unscored`` (examples whose
    positive has no score, so the ratio filter could not apply)."""
    stats = {"filtered": 0, "unscored": 0}
    chosen: list[list[int] | None] = [None] * len(examples)
    todo = [i for i, ex in enumerate(examples) if ex.positive is not None]
    if not todo:
        return chosen, stats
    queries = [query_of(examples[i], settings.query) for i in todo]
    scores, rows, pos_scores = retriever.rank(queries, [examples[i].positive for i in todo], settings.window[1])
    for j, i in enumerate(todo):
        if settings.max_positive_ratio is not None and not np.isfinite(pos_scores[j]):
            stats["unscored"] += 1
        chosen[i], filtered = _draw(examples[i], positions[i], ids, text_hashes, rows[j], scores[j],
                                    float(pos_scores[j]), settings)
        stats["filtered"] += filtered
    return chosen, stats


def mine_examples(examples: Sequence[TrainingExample], positions: Sequence[int], retriever: Any,
                  passages: Sequence[Passage], settings: MineSettings) -> tuple[list[TrainingExample], dict]:
    """The in-memory form of :func:`choose_negatives` (a corpus given as its passages, row-aligned with the
    retriever's ranking): the examples with their negatives replaced by the mined passages (an example without a
    positive is kept as it is), and the same ``stats``."""
    chosen, stats = choose_negatives(examples, positions, retriever, [p.id for p in passages],
                                     _text_hashes(passages), settings)
    out = [ex if rows is None else replace(ex, negatives=[passages[r] for r in rows])
           for ex, rows in zip(examples, chosen)]
    return out, stats


# ------------------------------------------------------------------------------------------ writing records
def _passage_json(passage: Passage, id_key: str = "id") -> dict:
    out: dict[str, Any] = {id_key: passage.id}
    if passage.title:
        out["title"] = passage.title
    out["text"] = passage.text
    return out


def _split_id(example_id: str) -> tuple[str, str]:
    conv, sep, turn = example_id.rpartition("_")
    return (conv, turn) if sep else (example_id, "1")


def group_records(examples: Sequence[TrainingExample], fmt: str) -> list[list[int]]:
    """Indices of the examples of each output record: an UltraChat conversation holds consecutive examples
    ``{conv_id}_{k}``; every other format has one example a record."""
    if fmt != "ultrachat":
        return [[i] for i in range(len(examples))]
    groups: list[list[int]] = []
    last = None
    for i, ex in enumerate(examples):
        conv = _split_id(ex.id)[0]
        if groups and conv == last:
            groups[-1].append(i)
        else:
            groups.append([i])
        last = conv
    return groups


def record_of(examples: Sequence[TrainingExample], fmt: str) -> dict:
    """The JSON record ``read_training`` reads back as ``examples`` (the same format as the input file)."""
    if fmt == "ultrachat":
        conv_id = _split_id(examples[0].id)[0]
        turns = [{"role": "User" if t.role == USER else "Assistant", "text": t.text} for t in examples[0].history]
        expected = list(examples[0].history)
        for ex in examples:
            if list(ex.history) != expected:
                raise ValueError(f"example {ex.id}: its session is not the conversation so far; cannot rewrite "
                                 "it as one UltraChat conversation")
            user = {"role": "User", "text": ex.query}
            if ex.rewrite:
                user["rewrite"] = ex.rewrite
            turns.append(user)
            turns.append({"role": "Assistant", "text": ex.positive.text, "pos_id": ex.positive.id,
                          "neg_texts": [n.text for n in ex.negatives], "neg_ids": [n.id for n in ex.negatives]})
            expected += [Turn(USER, ex.query), Turn(ASSISTANT, ex.positive.text)]
        return {"conv_id": conv_id, "conversation": turns}
    (ex,) = examples
    if fmt == "tevatron":
        if ex.history:
            raise ValueError(f"example {ex.id}: a Tevatron record has no session")
        return {"query_id": ex.id, "query": ex.query,
                "positive_passages": [_passage_json(p, "docid") for p in _positives(ex)],
                "negative_passages": [_passage_json(n, "docid") for n in ex.negatives]}
    conv, turn = _split_id(ex.id)
    record: dict[str, Any] = {"Conversation_no": conv, "Turn_no": int(turn) if turn.isdigit() else turn,
                              "Question": ex.query}
    if ex.rewrite:
        record["Rewrite"] = ex.rewrite
    if ex.response is not None:
        record["Answer"] = ex.response
    record["Context"] = [t.text for t in ex.history]
    if ex.positive is not None:
        record["Gold_passage"] = _passage_json(ex.positive)
        record["Hard_negatives"] = [_passage_json(n) for n in ex.negatives]
    return record


# ------------------------------------------------------------------------------------------ the run
def _fingerprint(path: str | os.PathLike) -> dict:
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _training_corpus(train_file: str | os.PathLike, fmt: str, corpus: str | os.PathLike) -> dict | None:
    """The passages a Tevatron file in the new schema names by id (``positive_document_ids`` /
    ``negative_document_ids``), fetched from ``corpus`` in one streaming pass; ``None`` for other formats."""
    from ..data import detect_format
    from ..data.readers import iter_records

    if (detect_format(train_file) if fmt == "auto" else fmt) != "tevatron":
        return None
    wanted: set[str] = set()
    for _, obj in iter_records(train_file):
        if isinstance(obj, dict):
            for key in ("positive_document_ids", "negative_document_ids"):
                value = obj.get(key)
                if isinstance(value, list):
                    wanted.update(str(d) for d in value if isinstance(d, (str, int)) and not isinstance(d, bool))
    return _data.select_passages(corpus, wanted)


STATE = "state.json"
#: what mine writes into its work directory, and all it ever deletes there
WORK_ENTRIES = (STATE, "chunks", "corpus", "index", "text_hashes.npy", "bm25")


def _claim_work_dir(work: Path, restart: bool) -> None:
    """Make ``work`` mine's: a new or empty directory, or one holding mine's ``state.json``. A directory with
    other files and no state is refused (its files are never touched); ``restart`` deletes mine's entries."""
    if work.is_dir() and not (work / STATE).is_file():
        others = sorted(p.name for p in work.iterdir() if not _is_mines(p.name))
        if others:
            raise ValueError(f"--work-dir {work} holds files mine did not write ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}) and no {STATE}: give mine a directory of its "
                             "own (a new or empty one; the default is OUTPUT.work)")
    if restart:
        _remove_work(work, keep_dir=True)


def _is_mines(name: str) -> bool:
    """An entry mine writes in its work directory, or the temporary form of one (``.state.json.X.tmp``,
    ``.bm25.tmp-X``) an interrupted write leaves."""
    return name in WORK_ENTRIES or any(name.startswith(f".{entry}.") for entry in WORK_ENTRIES)


def _remove_work(work: Path, keep_dir: bool = False) -> None:
    """Delete what mine wrote in ``work`` (:data:`WORK_ENTRIES` and their temporary forms), then ``work`` itself
    when that left it empty (and not ``keep_dir``): a file of anyone else stays, and so does the directory."""
    if not work.is_dir():
        return
    for entry in work.iterdir():
        if not _is_mines(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if not keep_dir:
        with contextlib.suppress(OSError):
            work.rmdir()


def _difference(previous: dict, state: dict) -> str:
    keys = [k for k in sorted(set(previous) | set(state)) if previous.get(k) != state.get(k)]
    return "; ".join(f"{k}: {previous.get(k)!r} -> {state.get(k)!r}" for k in keys)


def mine(train_file: str | os.PathLike, corpus: str | os.PathLike, retriever: Any, output: str | os.PathLike,
         settings: MineSettings = MineSettings(), train_format: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE,
         work_dir: str | os.PathLike | None = None, restart: bool = False, keep_work: bool = False,
         progress: bool = True, retriever_name: str | None = None, overwrite: bool = False) -> dict:
    """Mine negatives for ``train_file`` against ``corpus`` with ``retriever`` and write ``output`` (same format
    as the input). The corpus is read by streaming passes only (see the module's docstring for what each
    retriever holds). Returns the report: ``examples``, ``mined`` (examples with a positive),
    ``negatives_per_example`` (``{count: examples}``), ``fewer_than_asked`` (examples that got fewer than
    ``num_negatives``: too few candidates in the window; also logged as a warning on the ``convret.mine``
    logger), ``filtered``, ``unscored``, ``records``, ``format``.

    The work directory is mine's alone: one with other files and no ``state.json`` is refused, and mine deletes
    only what it wrote there (:data:`WORK_ENTRIES`). Work of another retriever (by content: a model retrained at
    the same path differs), input or setting is refused naming the difference; ``restart`` starts over. An
    existing ``output`` is replaced only with ``overwrite``."""
    from tqdm.auto import tqdm

    from ..data import ReadReport, read_training

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    output = Path(output)
    work = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".work")
    if not Path(corpus).is_file():
        raise FileNotFoundError(f"{corpus}: no such file")
    check_output(output, {}, None, overwrite, "a training file", "pass --overwrite to replace it, or another --output")
    if output.resolve() == Path(train_file).resolve():
        raise ValueError(f"--output {output} is the training file itself: write the mined file elsewhere")
    report = ReadReport()
    examples = list(read_training(train_file, format=train_format,
                                  corpus=_training_corpus(train_file, train_format, corpus), report=report))
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not examples:
        raise ValueError(f"{train_file}: no training examples")
    fmt = report.format
    groups = group_records(examples, fmt)
    chunks = [groups[s : s + chunk_size] for s in range(0, len(groups), chunk_size)]
    state = {"train_file": _fingerprint(train_file), "format": fmt, "corpus": _fingerprint(corpus),
             "retriever": retriever_name or getattr(retriever, "name", type(retriever).__name__),
             "retriever_identity": getattr(retriever, "identity", None),
             "settings": asdict(settings), "chunk_size": chunk_size,
             "version": 4}  # 4: BM25 draws only the passages it retrieved (version 3 chunks may hold others)
    state_path = work / STATE
    _claim_work_dir(work, restart)
    if state_path.is_file():
        previous = json.loads(state_path.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(state)):
            raise ValueError(f"{work} holds a mining run of another retriever, input or setting "
                             f"({_difference(previous, json.loads(json.dumps(state)))}); pass --restart to start "
                             "over (it deletes only what mine wrote there), or another --work-dir")
    else:
        with atomic_write(state_path) as handle:
            json.dump(state, handle, indent=1)
    retriever.prepare(corpus, work, progress)
    chunk_dir = work / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    paths = [chunk_dir / f"chunk-{c:05d}.json" for c in range(len(chunks))]
    todo = [c for c in range(len(chunks)) if not paths[c].is_file()]
    bar = tqdm(total=sum(len(g) for c in todo for g in chunks[c]), unit="ex", desc="mine", disable=not progress)
    try:
        for c in todo:
            positions = [i for g in chunks[c] for i in g]
            chosen, stats = choose_negatives([examples[i] for i in positions], positions, retriever,
                                             retriever.ids, retriever.text_hashes, settings)
            negatives = [None if rows is None else [retriever.ids[r] for r in rows] for rows in chosen]
            with atomic_write(paths[c]) as handle:
                json.dump({"negatives": negatives, **stats}, handle, ensure_ascii=False)
            bar.update(len(positions))
    finally:
        bar.close()
    # the texts: one streaming pass over the corpus keeping the chosen ids only
    mined = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    texts = _data.select_passages(corpus, {i for chunk in mined for ids in chunk["negatives"] if ids for i in ids})
    histogram: dict[int, int] = {}
    totals = {"filtered": 0, "unscored": 0}
    with atomic_write(output) as out:
        for chunk, chunk_groups in zip(mined, chunks):
            new = {}
            for i, ids in zip((i for g in chunk_groups for i in g), chunk["negatives"]):
                if ids is None:
                    new[i] = examples[i]
                    continue
                missing = [d for d in ids if d not in texts]
                if missing:
                    raise ValueError(f"{corpus}: passage {missing[0]!r} (mined for example {examples[i].id}) is no "
                                     f"longer in the corpus; pass --restart")
                new[i] = replace(examples[i], negatives=[texts[d] for d in ids])
                histogram[len(ids)] = histogram.get(len(ids), 0) + 1
            for g in chunk_groups:
                out.write(json.dumps(record_of([new[i] for i in g], fmt), ensure_ascii=False) + "\n")
            for key in totals:
                totals[key] += chunk[key]
    if not keep_work:
        _remove_work(work)
    short = sum(n for count, n in histogram.items() if count < settings.num_negatives)
    if short:
        logger.warning("%s: %d of %d examples got fewer than %d negatives: too few candidates in ranks %d-%d (the "
                       "passages the retriever retrieved there, less the example's positives%s; a passage it did "
                       "not retrieve is never drawn)", output, short, sum(histogram.values()),
                       settings.num_negatives, *settings.window,
                       " and what the ratio filter dropped" if settings.max_positive_ratio is not None else "")
    return {"format": fmt, "records": len(groups), "examples": len(examples), "mined": sum(histogram.values()),
            "negatives_per_example": dict(sorted(histogram.items())), "fewer_than_asked": short, **totals,
            "output": str(output)}


def format_report(report: dict, settings: MineSettings) -> str:
    lo, hi = settings.window
    lines = [f"mined {report['mined']} of {report['examples']} examples ({report['records']} {report['format']} "
             f"records; ranks {lo}-{hi}, up to {settings.num_negatives} negatives) -> {report['output']}"]
    for count, n in report["negatives_per_example"].items():
        lines.append(f"  {n} examples got {count} negative{'s' if count != 1 else ''}")
    if report["fewer_than_asked"]:
        lines.append(f"  {report['fewer_than_asked']} examples got fewer than {settings.num_negatives}: too few "
                     f"candidates in ranks {lo}-{hi} (retrieved there, not a positive; bm25 retrieves the passages "
                     "sharing a term with the query)")
    if report["examples"] > report["mined"]:
        lines.append(f"  {report['examples'] - report['mined']} examples have no positive (kept as they were)")
    if settings.max_positive_ratio is not None:
        lines.append(f"  false-negative filter (score > {settings.max_positive_ratio} x positive's): "
                     f"{report['filtered']} candidates dropped; {report['unscored']} examples whose positive has "
                     "no score (not in the corpus for bm25): filter not applied")
    return "\n".join(lines)


def _check_inputs(train_file: str, fmt: str, corpus: str, output: str, overwrite: bool) -> None:
    """Before a retriever's model is loaded: the training file's format, the corpus, the output."""
    from ..data import DataError, detect_format
    from ..data.readers import TRAINING_FORMATS

    if not Path(train_file).is_file():
        raise DataError(train_file, 0, "no such file")
    found = detect_format(train_file) if fmt == "auto" else fmt
    if found not in TRAINING_FORMATS:
        raise DataError(train_file, 0, f"a {found} file, not training data (formats: {', '.join(TRAINING_FORMATS)})")
    _data.check_input(corpus, "auto", "collection")
    check_output(output, {}, None, overwrite, "a training file", "pass --overwrite to replace it, or another --output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret mine",
        description="Hard-negative mining (ChatRetriever appendix A.3): retrieve each training example's query from "
                    "a corpus and sample its negatives from a rank window (default ranks 15-30), never a positive. "
                    "Writes the training file back in its own format (UltraChat: neg_texts / neg_ids of each "
                    "Assistant turn; Tevatron: negative_passages; QReCC / TopiOCQA triplets: Hard_negatives), with "
                    "the mined negatives replacing the file's. Resumable: rerun the same command after an "
                    "interruption. See docs/data.md.")
    p.add_argument("--train-file", "--train_file", required=True, help="training file (any format convret train reads)")
    p.add_argument("--format", default="auto", help="format of the training file (auto: detected)")
    p.add_argument("--corpus", required=True, help="passage collection to mine from (also joins Tevatron docids)")
    p.add_argument("--retriever", required=True,
                   help="bm25, a convret checkpoint directory or a sentence-transformers model directory")
    p.add_argument("--output", required=True, help="training file to write (atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (never replaced without it: a training file does not record "
                        "what produced it)")
    p.add_argument("--num-negatives", "--num_negatives", type=int, default=4, help="negatives per example (4)")
    p.add_argument("--window", default="15-30", help="ranks LO-HI (1-based, inclusive) to sample from (15-30)")
    p.add_argument("--query", choices=QUERY_MODES, default="auto",
                   help="auto: the rewrite when the example has one, else the session; rewrite; session")
    p.add_argument("--max-positive-ratio", type=float, default=None,
                   help="drop candidates scoring above this fraction of the positive's score (false-negative "
                        "filter, e.g. 0.95; off by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (per example)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="records per resumable chunk")
    p.add_argument("--work-dir", default=None,
                   help="work directory, mine's alone: new, empty or an earlier mine's (default OUTPUT.work)")
    p.add_argument("--restart", action="store_true",
                   help="delete what mine wrote in the work directory first (its other files stay)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (embeddings, index, chunks)")
    p.add_argument("--device", default=None, help="torch device of a dense retriever (default cpu)")
    p.add_argument("--token-budget", type=int, default=None, help="convret checkpoint: tokens per forward pass")
    p.add_argument("--shard-size", type=int, default=50_000, help="corpus embeddings per resumable shard")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    try:
        settings = MineSettings(window=parse_window(args.window), num_negatives=args.num_negatives, seed=args.seed,
                                query=args.query, max_positive_ratio=args.max_positive_ratio)
        _check_inputs(args.train_file, args.format, args.corpus, args.output, args.overwrite)
        retriever = make_retriever(args.retriever, args.device, args.token_budget, args.shard_size)
        started = time.perf_counter()
        report = mine(args.train_file, args.corpus, retriever, args.output, settings, args.format, args.chunk_size,
                      args.work_dir, args.restart, args.keep_work, progress=not args.no_progress,
                      overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        print(f"convret mine: error: {error}", file=sys.stderr)
        return 1
    print(format_report(report, settings) + f"\n  ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0
