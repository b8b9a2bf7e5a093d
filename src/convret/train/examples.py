"""The training examples of ``convret train``: one file (``--train_file``, the bundled sample world by default)
read and checked, with a line saying what was read; :mod:`convret.train.mixture` reads each of several sources
through it."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["read_examples", "default_train_file"]


def default_train_file(recipe: str) -> str:
    from ..data import sample_world

    name = sample_world.TRAIN_TRIPLETS if recipe == "uniconv" else sample_world.TRAIN_ULTRACHAT
    return str(Path(sample_world.SAMPLE_WORLD_DIR) / name)


def read_examples(data_args: Any, loss_args: Any, sources: list[dict[str, Any]] | None = None) -> list:
    """All training examples of ``data_args.train_file`` (the sample world's by default), with a report: one line
    on stderr naming the file, its format and the example count (appended to ``sources`` for ``log.jsonl``).

    Raises:
        ValueError: no usable example, or none with a positive passage (both recipes train a retriever on
            (session, positive passage) pairs: without one the contrastive loss is 0), naming the file and counts.
    """
    from ..data import ReadReport, read_training

    path = data_args.train_file or default_train_file(loss_args.recipe)
    report = ReadReport()
    examples = []
    for example in read_training(path, format=data_args.train_format, corpus=data_args.corpus, report=report):
        examples.append(example)
        if data_args.max_examples is not None and len(examples) >= data_args.max_examples:
            break
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    read = len(examples)
    if loss_args.recipe == "uniconv":
        if report.format == "ultrachat":
            raise ValueError(f"{path}: the uniconv recipe trains on (session, gold passage, response) triplets "
                             "(QReCC / TopiOCQA style); UltraChat data uses the response itself as the positive")
        examples = [ex for ex in examples if ex.positive is None or ex.response is None
                    or ex.positive.text.strip() != ex.response.strip()]
    dropped = f", {read - len(examples)} dropped (their gold passage is their response)" if read > len(examples) \
        else ""
    if not examples:
        raise ValueError(f"{path}: no usable training examples ({report.format}: {read} read{dropped}, "
                         f"{report.skipped} records skipped; `convret data check {path}` lists what is wrong)")
    positives = sum(ex.positive is not None for ex in examples)
    if positives == 0:
        raise ValueError(f"{path}: none of its {len(examples)} {report.format} examples has a positive passage "
                         "(QReCC / TopiOCQA: Gold_passage; Tevatron: positive_passages or positive_document_ids with "
                         f"--corpus): the {loss_args.recipe} recipe trains a retriever on (session, positive passage) "
                         "pairs, and its contrastive loss would be 0. Give a file with positives")
    sample_world = not data_args.train_file
    if int(os.environ.get("RANK", "0")) == 0:
        where = f"no train_file given: the bundled sample world, {path}" if sample_world else path
        print(f"convret train: training on {where} ({report.format}): {len(examples)} examples, {positives} with a "
              f"positive passage{dropped}", file=sys.stderr)
    if sources is not None:
        sources.append({"train_file": str(path), "format": report.format, "examples": len(examples),
                        "with_positive": positives, "skipped_records": report.skipped,
                        "sample_world": sample_world})
    return examples
