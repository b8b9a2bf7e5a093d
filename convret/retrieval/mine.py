"""``convret mine``: hard negatives for a training file, sampled from a rank window of a retriever's ranking.

ChatRetriever's recipe (appendix A.3): for each training turn, retrieve from a corpus with the turn's rewrite and
sample the negatives from ranks 15 to 30. ``convret mine`` does that for any training file ``convret train``
reads (UltraChat-style, Tevatron, QReCC / TopiOCQA-style triplets) and writes the same file back, in the same
format, with every example's negatives replaced by the mined ones.

Retrievers (``--retriever``):

- a convret checkpoint (a directory with ``convret_config.json``): passages and sessions are formatted and
  embedded exactly as ``convret encode`` does (:class:`~convret.retrieval.encoder.Encoder`,
  :func:`~convret.retrieval.encode.encode_to_dir`), an exact inner-product index
  (:func:`~convret.retrieval.index.build_index`) and :func:`~convret.retrieval.search.search_index`;
- a sentence-transformers model directory (``modules.json``): ``encode_document`` / ``encode_query`` (normalised
  when its similarity is cosine), the same embedding directory, index and search;
- ``bm25``: BM25 (``bm25s``, Lucene variant, English stop words), for when no dense model exists yet.

The ranking is score-descending with equal scores ordered by docid (as ``convret search``). For each example:

1. the query is the rewrite when the example has one (``--query auto``, the default), the rewrite always
   (``rewrite``: an example without one is an error) or the session (``session``);
2. the candidates are the passages at ranks ``LO..HI`` (1-based, inclusive; ``--window 15-30``);
3. a candidate is dropped when it is the example's positive (same id or same text);
4. with ``--max-positive-ratio F``, a candidate is also dropped when its score exceeds ``F`` times the
   positive's score (the false-negative filter of positive-aware mining, NV-Retriever's "TopK-PercPos": a
   passage the retriever scores nearly as high as the gold one is often an unlabelled positive; 0.95 is the
   usual value; meant for positive scores > 0);
5. ``--num-negatives`` of the remaining candidates are drawn without replacement with a generator seeded by
   ``(--seed, the example's position in the file, its id)``: the draw of one example does not depend on any
   other, so a resumed run draws the same.

Resumable and atomic like ``convret encode``: everything goes into a work directory (``OUTPUT.work/`` by
default): the corpus embeddings (shards kept across reruns), the index, and the mined records in chunks of
``--chunk-size`` records, each written atomically. A rerun with the same settings keeps what is complete; the
output file is written atomically at the end, then the work directory is deleted (``--keep-work`` keeps it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from .._io import atomic_write
from ..data.records import ASSISTANT, USER, Passage, TrainingExample, Turn

__all__ = ["MineSettings", "mine", "mine_examples", "make_retriever", "parse_window", "query_of", "rank_scores",
           "BM25Retriever", "DenseRetriever", "main"]

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


def rank_scores(scores: np.ndarray, depth: int, id_rank: np.ndarray) -> np.ndarray:
    """Indices of the ``depth`` best of ``scores`` (one query), score descending, ties by ``id_rank``
    ascending (the docid order)."""
    depth = min(depth, len(scores))
    kth = np.partition(-scores, depth - 1)[depth - 1]
    candidates = np.nonzero(-scores <= kth)[0]
    order = np.lexsort((id_rank[candidates], -scores[candidates]))[:depth]
    return candidates[order]


def _id_ranks(ids: Sequence[str]) -> np.ndarray:
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return ranks


# ------------------------------------------------------------------------------------------ retrievers
class BM25Retriever:
    """BM25 over the corpus with ``bm25s`` (title and text; lower-cased, English stop words removed)."""

    name = "bm25"

    def __init__(self) -> None:
        try:
            import bm25s  # noqa: F401
        except ImportError as error:
            raise ValueError("--retriever bm25 needs the bm25s package (pip install bm25s, or "
                             "pip install -e .[retrieval])") from error

    def prepare(self, passages: Sequence[Passage], work: Path, progress: bool) -> None:
        import bm25s

        self.ids = [p.id for p in passages]
        self.id_rank = _id_ranks(self.ids)
        self.row_of_text = {p.text.strip(): i for i, p in enumerate(passages)}
        self.row_of_id = {p.id: i for i, p in enumerate(passages)}
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize([_passage_text(p) for p in passages], stopwords="en",
                                       show_progress=progress), show_progress=progress)

    def scores(self, text: str) -> np.ndarray:
        """bm25s's scores of every corpus passage for ``text`` (zeros when no token is left)."""
        import bm25s

        tokens = bm25s.tokenize([text], stopwords="en", return_ids=False, show_progress=False)[0]
        if not tokens:
            return np.zeros(len(self.ids), dtype=np.float32)
        return np.asarray(self.bm25.get_scores(tokens))

    def rank(self, queries: Sequence[tuple[list[Turn], str]], positives: Sequence[Passage | None],
             depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        all_scores, all_rows, pos_scores = [], [], []
        for (history, query), positive in zip(queries, positives):
            scores = self.scores(_flat_query(history, query))
            rows = rank_scores(scores, depth, self.id_rank)
            all_rows.append(rows)
            all_scores.append(scores[rows])
            row = None if positive is None else self.row_of_id.get(positive.id,
                                                                   self.row_of_text.get(positive.text.strip()))
            # a positive outside the corpus has no BM25 score under the corpus's statistics
            pos_scores.append(np.nan if row is None else float(scores[row]))
        return np.stack(all_scores), np.stack(all_rows), np.asarray(pos_scores, dtype=np.float64)


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
        if progress is not None:
            progress(len(items))
        return out

    def passage_tokens(self, passage: Passage) -> list[int]:
        """A one-element "sequence", the passage's row in a text table: ``encode_to_dir`` moves token ids, a
        sentence-transformers model takes text."""
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

    def __init__(self, encoder: Any, name: str, shard_size: int = 50_000):
        self.encoder = encoder
        self.name = name
        self.shard_size = shard_size

    def prepare(self, passages: Sequence[Passage], work: Path, progress: bool) -> None:
        from .encode import encode_to_dir
        from .index import build_index, load_index

        corpus_dir, index_dir = work / "corpus", work / "index"
        if not (index_dir / "meta.json").is_file():
            ids = [p.id for p in passages]
            items = [self.encoder.passage_tokens(p) for p in passages]
            if not (corpus_dir / "meta.json").is_file():
                encode_to_dir(self.encoder, ids, items, corpus_dir, shard_size=self.shard_size, kind="passages",
                              progress=progress)
            build_index(corpus_dir, index_dir, "Flat", use_gpu=None)
        self.index, self.ids, _ = load_index(index_dir)

    def rank(self, queries: Sequence[tuple[list[Turn], str]], positives: Sequence[Passage | None],
             depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from .search import search_index

        vectors = self.encoder.queries(queries)
        scores, rows = search_index(self.index, vectors, depth, ids=self.ids)
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
        return DenseRetriever(_ConvretEncoder(spec, device, token_budget), f"convret:{path}", shard_size)
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return DenseRetriever(_SentenceTransformerEncoder(spec, device), f"sentence-transformers:{path}",
                              shard_size)
    raise ValueError(f"--retriever {spec}: not 'bm25', a convret checkpoint (convret_config.json) or a "
                     "sentence-transformers model directory (modules.json)")


# ------------------------------------------------------------------------------------------ sampling
def _draw(example: TrainingExample, position: int, passages: Sequence[Passage], rows: np.ndarray,
          scores: np.ndarray, positive_score: float, settings: MineSettings) -> tuple[list[int], int]:
    """Corpus rows of the negatives of one example, and how many window candidates the ratio filter dropped."""
    lo, hi = settings.window
    positive = example.positive
    candidates, filtered = [], 0
    for rank in range(lo, min(hi, len(rows)) + 1):
        row, score = int(rows[rank - 1]), float(scores[rank - 1])
        if row < 0:
            continue
        passage = passages[row]
        if passage.id == positive.id or passage.text.strip() == positive.text.strip():
            continue
        if settings.max_positive_ratio is not None and np.isfinite(positive_score) \
                and score > settings.max_positive_ratio * positive_score:
            filtered += 1
            continue
        candidates.append(row)
    rng = random.Random(f"{settings.seed}\x00{position}\x00{example.id}")
    return rng.sample(candidates, min(settings.num_negatives, len(candidates))), filtered


def mine_examples(examples: Sequence[TrainingExample], positions: Sequence[int], retriever: Any,
                  passages: Sequence[Passage], settings: MineSettings) -> tuple[list[TrainingExample], dict]:
    """The examples with their negatives replaced by mined ones (an example without a positive is kept as it
    is); ``stats``: ``filtered`` (window candidates dropped by the ratio filter), ``unscored`` (examples whose
    positive has no score, so the ratio filter could not apply)."""
    stats = {"filtered": 0, "unscored": 0}
    todo = [i for i, ex in enumerate(examples) if ex.positive is not None]
    out = list(examples)
    if not todo:
        return out, stats
    queries = [query_of(examples[i], settings.query) for i in todo]
    scores, rows, pos_scores = retriever.rank(queries, [examples[i].positive for i in todo], settings.window[1])
    for j, i in enumerate(todo):
        ex = examples[i]
        if settings.max_positive_ratio is not None and not np.isfinite(pos_scores[j]):
            stats["unscored"] += 1
        chosen, filtered = _draw(ex, positions[i], passages, rows[j], scores[j], float(pos_scores[j]), settings)
        stats["filtered"] += filtered
        out[i] = TrainingExample(ex.id, ex.history, ex.query, ex.positive, [passages[r] for r in chosen],
                                 ex.response, ex.rewrite)
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
        return {"query_id": ex.id, "query": ex.query, "positive_passages": [_passage_json(ex.positive, "docid")],
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


def mine(train_file: str | os.PathLike, corpus: str | os.PathLike, retriever: Any, output: str | os.PathLike,
         settings: MineSettings = MineSettings(), train_format: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE,
         work_dir: str | os.PathLike | None = None, restart: bool = False, keep_work: bool = False,
         progress: bool = True, retriever_name: str | None = None) -> dict:
    """Mine negatives for ``train_file`` against ``corpus`` with ``retriever`` and write ``output`` (same format
    as the input). Returns the report: ``examples``, ``mined`` (examples with a positive),
    ``negatives_per_example`` (``{count: examples}``), ``filtered``, ``unscored``, ``records``, ``format``."""
    from tqdm.auto import tqdm

    from ..data import ReadReport, read_collection, read_training

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    output = Path(output)
    work = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".work")
    passages = list(read_collection(corpus, strict=True))
    if not passages:
        raise ValueError(f"{corpus}: empty corpus")
    by_id: dict[str, Passage] = {}
    for n, p in enumerate(passages):
        if p.id in by_id:
            raise ValueError(f"{corpus}: duplicate passage id {p.id!r} (passage {n + 1})")
        by_id[p.id] = p
    report = ReadReport()
    examples = list(read_training(train_file, format=train_format, corpus=by_id, report=report))
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not examples:
        raise ValueError(f"{train_file}: no training examples")
    fmt = report.format
    groups = group_records(examples, fmt)
    chunks = [groups[s : s + chunk_size] for s in range(0, len(groups), chunk_size)]
    state = {"train_file": _fingerprint(train_file), "format": fmt, "corpus": _fingerprint(corpus),
             "retriever": retriever_name or getattr(retriever, "name", type(retriever).__name__),
             "settings": asdict(settings), "chunk_size": chunk_size, "version": 1}
    state_path = work / "state.json"
    if restart and work.exists():
        shutil.rmtree(work)
    if state_path.is_file():
        previous = json.loads(state_path.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(state)):
            raise ValueError(f"{work} holds a mining run with other settings or inputs; pass --restart to delete it "
                             "(or another --work-dir)")
    else:
        with atomic_write(state_path) as handle:
            json.dump(state, handle, indent=1)
    retriever.prepare(passages, work, progress)
    chunk_dir = work / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    paths = [chunk_dir / f"chunk-{c:05d}.json" for c in range(len(chunks))]
    todo = [c for c in range(len(chunks)) if not paths[c].is_file()]
    bar = tqdm(total=sum(len(g) for c in todo for g in chunks[c]), unit="ex", desc="mine", disable=not progress)
    try:
        for c in todo:
            positions = [i for g in chunks[c] for i in g]
            mined, stats = mine_examples([examples[i] for i in positions], positions, retriever, passages, settings)
            new = dict(zip(positions, mined))
            records = [record_of([new[i] for i in g], fmt) for g in chunks[c]]
            counts = [len(new[i].negatives) if new[i].positive is not None else None for i in positions]
            with atomic_write(paths[c]) as handle:
                json.dump({"records": records, "negatives": counts, **stats}, handle, ensure_ascii=False)
            bar.update(len(positions))
    finally:
        bar.close()
    histogram: dict[int, int] = {}
    totals = {"filtered": 0, "unscored": 0}
    with atomic_write(output) as out:
        for path in paths:
            chunk = json.loads(path.read_text(encoding="utf-8"))
            for record in chunk["records"]:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            for count in chunk["negatives"]:
                if count is not None:
                    histogram[count] = histogram.get(count, 0) + 1
            for key in totals:
                totals[key] += chunk[key]
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return {"format": fmt, "records": len(groups), "examples": len(examples), "mined": sum(histogram.values()),
            "negatives_per_example": dict(sorted(histogram.items())), **totals, "output": str(output)}


def format_report(report: dict, settings: MineSettings) -> str:
    lo, hi = settings.window
    lines = [f"mined {report['mined']} of {report['examples']} examples ({report['records']} {report['format']} "
             f"records; ranks {lo}-{hi}, up to {settings.num_negatives} negatives) -> {report['output']}"]
    for count, n in report["negatives_per_example"].items():
        lines.append(f"  {n} examples got {count} negative{'s' if count != 1 else ''}")
    if report["examples"] > report["mined"]:
        lines.append(f"  {report['examples'] - report['mined']} examples have no positive (kept as they were)")
    if settings.max_positive_ratio is not None:
        lines.append(f"  false-negative filter (score > {settings.max_positive_ratio} x positive's): "
                     f"{report['filtered']} candidates dropped; {report['unscored']} examples whose positive has "
                     "no score (not in the corpus for bm25): filter not applied")
    return "\n".join(lines)


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
    p.add_argument("--num-negatives", "--num_negatives", type=int, default=4, help="negatives per example (4)")
    p.add_argument("--window", default="15-30", help="ranks LO-HI (1-based, inclusive) to sample from (15-30)")
    p.add_argument("--query", choices=QUERY_MODES, default="auto",
                   help="auto: the rewrite when the example has one, else the session; rewrite; session")
    p.add_argument("--max-positive-ratio", type=float, default=None,
                   help="drop candidates scoring above this fraction of the positive's score (false-negative "
                        "filter, e.g. 0.95; off by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (per example)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="records per resumable chunk")
    p.add_argument("--work-dir", default=None, help="work directory (default OUTPUT.work)")
    p.add_argument("--restart", action="store_true", help="delete the work directory first")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (embeddings, index, chunks)")
    p.add_argument("--device", default=None, help="torch device of a dense retriever (default cpu)")
    p.add_argument("--token-budget", type=int, default=None, help="convret checkpoint: tokens per forward pass")
    p.add_argument("--shard-size", type=int, default=50_000, help="corpus embeddings per resumable shard")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = MineSettings(window=parse_window(args.window), num_negatives=args.num_negatives, seed=args.seed,
                                query=args.query, max_positive_ratio=args.max_positive_ratio)
        retriever = make_retriever(args.retriever, args.device, args.token_budget, args.shard_size)
        started = time.perf_counter()
        report = mine(args.train_file, args.corpus, retriever, args.output, settings, args.format, args.chunk_size,
                      args.work_dir, args.restart, args.keep_work, progress=not args.no_progress)
    except (ValueError, OSError) as error:
        print(f"convret mine: error: {error}", file=sys.stderr)
        return 1
    print(format_report(report, settings) + f"\n  ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0
