"""Large collections as memory-mapped Hugging Face ``datasets`` (Apache Arrow), sharded by rank.

Which to use:

- :func:`convret.data.read_collection` streams a collection line by line in constant memory, validating every
  record (bad ones reported and skipped). Use it for one-process jobs and for anything up to a few million
  passages that is read once.
- :func:`load_collection` converts the file once into an Arrow cache (``cache_dir``; later calls and other
  processes reuse it) and memory-maps it: random access by index, ``len()``, and :func:`shard_for_rank` gives
  each of ``world_size`` encoding processes a contiguous slice without any process holding the collection in
  RAM. Use it for multi-GPU encoding of large collections (tens of millions of passages). It checks the
  columns but not every record: run ``convret data check`` on the file first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from .readers import COLLECTION_FORMATS, DataError, _first_char, detect_format
from .records import Passage

__all__ = ["load_collection", "shard_for_rank", "iter_passages"]


# JSON collection formats: their (id, text, title) columns; ikat-passages' id is built from two columns
_JSON_COLUMNS = {
    "collection": (("id", "docid"), ("text", "contents"), "title"),
    "beir-corpus": (("_id",), ("text",), "title"),
    "msmarco-v2-passage": (("pid",), ("passage",), None),
    "msmarco-v2.1-segmented": (("docid",), ("segment",), "title"),
    "ikat-passages": ((), ("passage_text",), None),
    "pyserini": (("id",), ("contents",), None),
}


def load_collection(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, rank: int | None = None,
                    world_size: int | None = None, num_proc: int | None = None, format: str = "auto") -> Any:
    """A collection file as a memory-mapped ``datasets.Dataset`` with string columns ``id``, ``title``, ``text``.

    Args:
        path: a collection in one of :data:`~convret.data.COLLECTION_FORMATS` but ``dpr-tsv`` (read that one with
            :func:`~convret.data.read_collection`): jsonl / JSON array ``{"id"|"docid", "text"|"contents",
            "title"?}``, BEIR, MS MARCO v2 / v2.1, iKAT passages (id ``{doc_id}:{passage_id}``), pyserini, or TSV
            ``pid<TAB>text``; ids and texts are those :func:`~convret.data.read_collection` gives.
        cache_dir: where the Arrow files go (``datasets``' default cache when ``None``).
        rank, world_size: return only this rank's contiguous shard (see :func:`shard_for_rank`).
        num_proc: processes for the one-time conversion.
        format: ``"auto"`` (detected as by :func:`~convret.data.detect_format`) or a collection format's name.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in COLLECTION_FORMATS or fmt == "dpr-tsv":
        raise DataError(path, 0, f"format {fmt!r}: load_collection reads {', '.join(_JSON_COLUMNS)} and tsv "
                                 "(read other formats, DPR's quoted TSV among them, with read_collection)")
    cache = None if cache_dir is None else str(cache_dir)
    if fmt in _JSON_COLUMNS and _first_char(path) in "[{":
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache, num_proc=num_proc)
        id_keys, text_keys, title_key = _JSON_COLUMNS[fmt]
        if fmt == "ikat-passages":
            ds = ds.map(lambda row: {"id": f"{row['doc_id']}:{row['passage_id']}"}, num_proc=num_proc)
        names = set(ds.column_names)
        for target, keys in (("id", id_keys), ("text", text_keys)):
            source = next((k for k in keys if k in names), None)
            if target not in names and source is not None:
                ds = ds.rename_column(source, target)
                names = set(ds.column_names)
        if title_key is None and "title" in names:
            ds = ds.remove_columns("title")
    else:
        # lines end at '\n' only (a bare '\r' inside a text is text, as in read_collection); a CRLF's '\r' is dropped
        features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})
        ds = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=cache, delimiter="\t",
                                   column_names=["id", "text"], features=features, quoting=3, lineterminator="\n",
                                   num_proc=num_proc)
        ds = ds.map(lambda row: {"id": row["id"].strip(), "text": row["text"][:-1] if row["text"].endswith("\r")
                                 else row["text"]}, num_proc=num_proc)
    missing = {"id", "text"} - set(ds.column_names)
    if missing:
        raise DataError(path, 0, f"collection lacks the column(s) {sorted(missing)}; has {ds.column_names}")
    if "title" not in ds.column_names:
        ds = ds.add_column("title", [""] * len(ds))
    ds = ds.select_columns(["id", "title", "text"])
    if ds.features["id"].dtype != "string":
        ds = ds.cast_column("id", datasets.Value("string"))
    if rank is not None or world_size is not None:
        ds = shard_for_rank(ds, rank or 0, world_size or 1)
    return ds


def shard_for_rank(dataset: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s contiguous shard of ``world_size``: the shards partition the dataset, in order
    (concatenated by rank they give it back), sizes differing by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return dataset.shard(num_shards=world_size, index=rank, contiguous=True)


def iter_passages(dataset: Any, batch_size: int = 1024) -> Iterator[Passage]:
    """:class:`Passage` objects of a dataset from :func:`load_collection`, read in Arrow batches."""
    for batch in dataset.iter(batch_size=batch_size):
        for pid, title, text in zip(batch["id"], batch["title"], batch["text"]):
            yield Passage(pid, text, title or "")
