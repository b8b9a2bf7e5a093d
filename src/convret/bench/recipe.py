"""``convret bench recipe``: the demo's training recipe part by part, each part over several seeds.

Every row trains the tiny retriever of ``make demo`` on the bundled sample world and evaluates it; each row adds
one part of ChatRetriever's recipe to the row above (``--list-rows`` prints them). A run is the demo's own
commands in child processes: ``convret mine`` (once per data file), ``convret train --seed S --init_seed S``,
``convret evaluate --query-only --rewrite``. Reported per run: NDCG@3 of the whole session, of the current
utterance alone and of the manual rewrite, the session's fraction of the rewrite, and where the errors are
(from the run files and the sample world's structure: the gold passage at rank 1, the right entity at rank 1,
the near-duplicate entity's passage ranked above the gold one, the other passages of the asked entity, judged
1, among the top 3). Per row: mean and standard deviation (population) over the seeds.

``--split`` says what is measured:

- ``eval`` (the default): train on every training session, report on the evaluation set (``eval.json`` and
  ``qrels.tsv``, untouched);
- ``validation``: hold out every tenth training session (160 sessions, ~700 turns; dropped from the training
  files, the mined ones included), train on the rest and report on the held-out sessions, qrels built as the
  evaluation set's (2: the passage of the asked entity and attribute, 1: the entity's other passages). For
  choosing settings without looking at the evaluation set.

The work directory (``--work``, default ``OUT/recipe-work``) keeps the mined files and every run (checkpoints,
evaluation); a rerun reuses each complete run and resumes an interrupted one. A run's directory name holds a
hash of its command and data, so changed settings never reuse another setting's run. Wall and CPU time of each
child are recorded (CPU time: user + system of the children, all threads; on a shared machine both grow with
the load, see ``load_average``). On a machine shared with other jobs pass ``--threads 1``: two torch threads on
two busy cores trained 600 steps in 1322 s, one thread in about 180 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import harness as H

NAME = "recipe"
SEEDS = (0, 1, 2)
HOLDOUT_EVERY = 10  # --split validation: sessions t0009, t0019, ... are held out
MINE_WINDOW, MINE_NEGATIVES, MINE_SEED = "15-30", 4, 0


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: its training sources and the flags of ``convret train`` that differ from the embedded default
    (``tiny.yaml``)."""

    key: str
    label: str
    # ((data, weight), ...): "bundled" (train.jsonl with its own negatives: the twin's passage first, then in half
    # the turns another passage of the same entity), "bm25" (train.jsonl, negatives mined by BM25), "adhoc"
    # (train_adhoc.jsonl, negatives mined by BM25); weights are the sources' shares of the batches
    sources: tuple[tuple[str, float], ...]
    flags: tuple[tuple[str, Any], ...]

    def train_flags(self) -> dict[str, Any]:
        return dict(self.flags)

    def data(self) -> str:
        return " + ".join(f"{key} {weight:g}" for key, weight in self.sources)


def _rows() -> tuple[list[Row], list[Row]]:
    """The ablation (each row adds one part to the one above it; the last one is ``make demo``) and the
    alternatives that were measured against it (run only when named in ``--rows``)."""
    before = Row("before", "the demo before: bundled negatives (1 per turn, sampled), 600 steps, lr 2e-3, tau 0.05",
                 (("bundled", 1.0),), (("num_negatives", 1), ("sample_negatives", True), ("max_steps", 600),
                                       ("learning_rate", 0.002), ("temperature", 0.05)))
    rows = [before]

    def variant(base: Row, key: str, label: str, **changes: Any) -> Row:
        flags = {**base.train_flags(), **changes.pop("flags", {})}
        return dataclasses.replace(base, key=key, label=label, flags=tuple(flags.items()), **changes)

    def add(key: str, label: str, **changes: Any) -> None:
        rows.append(variant(rows[-1], key, label, **changes))

    add("mined", "+ hard negatives mined by BM25 from ranks 15-30 (4 per turn)", sources=(("bm25", 1.0),),
        flags={"num_negatives": 4})
    add("adhoc", "+ ad hoc queries mixed in (0.8 sessions, 0.2 ad hoc, both mined)",
        sources=(("bm25", 0.8), ("adhoc", 0.2)))
    add("steps", "+ 1000 steps instead of 600", flags={"max_steps": 1000})
    steps = rows[-1]
    add("triplets", "+ the TopiOCQA-style sessions (short answers, as in the evaluation; mined) as a third source "
        "(0.4 sessions, 0.4 TopiOCQA-style, 0.2 ad hoc)", sources=(("bm25", 0.4), ("triplets", 0.4), ("adhoc", 0.2)))
    add("lr", "+ learning rate 1e-3 instead of 2e-3", flags={"learning_rate": 0.001})
    add("tau", "+ temperature 0.1 instead of 0.05", flags={"temperature": 0.1})
    add("demo", "- the ad hoc queries (0.5 sessions, 0.5 TopiOCQA-style): make demo",
        sources=(("bm25", 0.5), ("triplets", 0.5)))
    alternatives = [
        variant(before, "first-neg", "the demo before, first negative kept (the twin's passage, every turn)",
                flags={"sample_negatives": False}),
        variant(before, "both-neg", "the demo before, both bundled negatives of every turn",
                flags={"num_negatives": 2}),
        variant(steps, "twins", "mined + ad hoc + the bundled sessions (twin negatives) as a third source",
                sources=(("bm25", 0.4), ("bundled", 0.4), ("adhoc", 0.2))),
        variant(steps, "triplets-only", "the TopiOCQA-style sessions (mined) + ad hoc",
                sources=(("triplets", 0.8), ("adhoc", 0.2))),
        variant(steps, "triplets-heavy", "mined 0.2 + TopiOCQA-style 0.6 + ad hoc 0.2",
                sources=(("bm25", 0.2), ("triplets", 0.6), ("adhoc", 0.2))),
        variant(steps, "triplets-no-adhoc", "mined 0.5 + TopiOCQA-style 0.5, no ad hoc",
                sources=(("bm25", 0.5), ("triplets", 0.5))),
        variant(steps, "triplets-adhoc10", "mined 0.45 + TopiOCQA-style 0.45 + ad hoc 0.1",
                sources=(("bm25", 0.45), ("triplets", 0.45), ("adhoc", 0.1))),
    ]
    return rows, alternatives


ROWS, ALTERNATIVES = _rows()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default=None,
                        help="comma-separated row keys to run (default: every row; --list-rows prints them)")
    parser.add_argument("--list-rows", action="store_true", help="print the rows and their settings, then exit")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="comma-separated seeds (--seed and --init_seed of convret train; default 0,1,2)")
    parser.add_argument("--split", choices=("eval", "validation"), default="eval",
                        help="eval: train on every session, report on the evaluation set (default); validation: "
                             "hold out every tenth training session and report on those")
    parser.add_argument("--train-args", default="",
                        help="extra convret train flags for every row, written with '=' since they start with "
                             "dashes: --train-args=\"--temperature 0.02 --max_steps 1000\" (exploration)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each with cpu_count / jobs torch threads (default 1)")
    parser.add_argument("--work", default=None, help="work directory (default OUT/recipe-work): mined files, runs")


def apply_presets(args) -> None:
    if args.smoke:  # proves the chain works: two rows, one seed, a few steps
        args.rows = args.rows or f"{ROWS[0].key},{ROWS[-1].key}"
        args.seeds = args.seeds if args.seeds != ",".join(map(str, SEEDS)) else "0"
        args.train_args = f"{args.train_args} --max_steps 3 --per_device_train_batch_size 4".strip()
    elif args.quick:  # every row, one seed, a third of the steps
        args.seeds = args.seeds if args.seeds != ",".join(map(str, SEEDS)) else "0"
        args.train_args = f"{args.train_args} --max_steps 200".strip()


def selected_rows(spec: str | None) -> list[Row]:
    if not spec:
        return list(ROWS)
    by_key = {row.key: row for row in (*ROWS, *ALTERNATIVES)}
    unknown = [key for key in spec.split(",") if key not in by_key]
    if unknown:
        raise SystemExit(f"convret bench recipe: unknown row(s) {unknown}; the rows: {', '.join(by_key)}")
    return [by_key[key] for key in spec.split(",")]


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"convret bench recipe: --seeds {spec!r}: expected comma-separated integers") from None
    if not seeds:
        raise SystemExit("convret bench recipe: --seeds is empty")
    return seeds


# ------------------------------------------------------------------------------------------------ data
def _world():
    from ..data import sample_world

    return sample_world


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "convret", *argv]


class Children:
    """Child processes with their wall and CPU time (user + system of the child and its threads)."""

    def __init__(self, threads: int | None):
        self.env = dict(os.environ)
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)

    def run(self, argv: Sequence[str], log: Path) -> dict[str, float]:
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"$ {' '.join(argv)}\n")
            handle.flush()
            process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[2:4])} failed (exit {process.returncode}); its output: {log}")
        return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def prepare_data(work: Path, split: str, children: Children) -> dict[str, Path]:
    """The mined training files (and for ``validation`` the split): ``{"bundled", "bm25", "adhoc", and for
    validation "conversations", "qrels"}``. Kept across reruns."""
    world = _world()
    source = Path(world.SAMPLE_WORLD_DIR)
    data = work / "data"
    mined = {"bm25": (source / world.TRAIN_ULTRACHAT, data / "sessions.bm25.jsonl"),
             "adhoc": (source / world.TRAIN_ADHOC, data / "adhoc.bm25.jsonl"),
             "triplets": (source / world.TRAIN_TRIPLETS, data / "triplets.bm25.jsonl")}
    for _, (train_file, output) in mined.items():
        if not output.is_file():
            children.run(_cli("mine", "--train-file", str(train_file), "--corpus", str(source / world.COLLECTION),
                              "--retriever", "bm25", "--window", MINE_WINDOW, "--num-negatives", str(MINE_NEGATIVES),
                              "--seed", str(MINE_SEED), "--output", str(output), "--no-progress"),
                         data / "mine.log")
    files = {"bundled": source / world.TRAIN_ULTRACHAT, "bm25": mined["bm25"][1], "adhoc": mined["adhoc"][1],
             "triplets": mined["triplets"][1]}
    if split == "validation":
        files.update(validation_split(data / "validation", source,
                                      {k: files[k] for k in ("bundled", "bm25", "triplets")}))
    return files


def held_out(conv_id: str) -> bool:
    """Training session ``t0009``, ``t0019``, ...: the validation split."""
    return int(conv_id.lstrip("t")) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def _conversation_id(record: dict[str, Any]) -> str:
    """The session id of a training record: ``conv_id`` (UltraChat style) or ``Conversation_no`` (TopiOCQA)."""
    return record["conv_id"] if "conv_id" in record else record["Conversation_no"]


def validation_split(directory: Path, source: Path, session_files: dict[str, Path]) -> dict[str, Path]:
    """Session files without the held-out sessions, and the held-out sessions as an evaluation set: the
    sample world's evaluation format (question, manual rewrite, response per turn) and graded qrels."""
    from .._io import atomic_write

    world = _world()
    out = {key: directory / f"sessions-{key}.jsonl" for key in session_files}
    out["conversations"], out["qrels"] = directory / "conversations.json", directory / "qrels.tsv"
    if all(path.is_file() for path in out.values()):
        return out
    directory.mkdir(parents=True, exist_ok=True)
    for key, path in session_files.items():
        with open(path, encoding="utf-8") as lines, atomic_write(out[key]) as kept:
            for line in lines:
                if line.strip() and not held_out(_conversation_id(json.loads(line))):
                    kept.write(line)
    passages_of: dict[str, list[str]] = {}
    with open(source / world.COLLECTION, encoding="utf-8") as lines:
        for line in lines:
            pid = json.loads(line)["id"]
            passages_of.setdefault(pid.split("-")[0], []).append(pid)
    sessions: dict[str, list[dict]] = {}
    qrels: list[str] = []
    with open(source / world.TRAIN_TRIPLETS, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            conv, turn = record["Conversation_no"], record["Turn_no"]
            if not held_out(conv):
                continue
            sessions.setdefault(conv, []).append({"turn_id": turn, "question": record["Question"],
                                                  "manual_rewrite": record["Rewrite"], "response": record["Answer"]})
            gold = record["Gold_passage"]["id"]
            qrels += [f"{conv}_{turn} 0 {pid} {2 if pid == gold else 1}" for pid in passages_of[gold.split("-")[0]]]
    with atomic_write(out["conversations"]) as handle:
        json.dump([{"conv_id": conv, "turns": turns} for conv, turns in sessions.items()], handle)
    with atomic_write(out["qrels"]) as handle:
        handle.write("\n".join(qrels) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ runs
def row_files(row: Row, files: dict[str, Path]) -> list[tuple[Path, float]]:
    """The row's training files with their weights."""
    return [(files[key], weight) for key, weight in row.sources]


def train_command(row: Row, seed: int, files: dict[str, Path], output_dir: Path | str,
                  extra: Sequence[str]) -> list[str]:
    argv = ["train", "--output_dir", str(output_dir), "--seed", str(seed), "--init_seed", str(seed),
            "--disable_tqdm", "true", "--logging_steps", "50"]
    sources = row_files(row, files)
    if len(sources) == 1:
        argv += ["--train_file", str(sources[0][0])]
    else:
        argv += ["--train_files", ",".join(f"{path}:{weight:g}" for path, weight in sources)]
    for key, value in row.train_flags().items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return _cli(*argv, *extra)


def evaluate_command(model: Path, output: Path, files: dict[str, Path], split: str) -> list[str]:
    argv = ["evaluate", "--model", str(model), "--query-only", "--rewrite", "--output", str(output), "--overwrite"]
    if split == "validation":
        world = _world()
        argv += ["--conversations", str(files["conversations"]), "--qrels", str(files["qrels"]),
                 "--collection", str(Path(world.SAMPLE_WORLD_DIR) / world.COLLECTION)]
    return _cli(*argv)


def run_directory(work: Path, split: str, row: Row, seed: int, files: dict[str, Path],
                  extra: Sequence[str], legacy: bool = False) -> Path:
    """``WORK/SPLIT/ROW-sSEED-HASH``: the hash covers the training command (paths aside), the content and weight
    of each training file and the content of any file named in ``extra`` (``--model_config /x/l4.json``), so
    that a changed setting, weight, mined file or config behind the same path is a new run. ``legacy``: the hash
    before the weights were in it (the weights sit in the same argument as the paths, which were masked)."""
    from ..provenance import content_identity

    command = train_command(row, seed, files, "OUTPUT", extra)
    data: list[Any] = [content_identity(path) if legacy else [content_identity(path), weight]
                       for path, weight in row_files(row, files)]
    named = {arg for arg in extra if os.path.isfile(arg)}
    identity = [f"file:{content_identity(arg)}" if arg in named else "PATH" if arg.startswith("/") else arg
                for arg in command[3:]]
    digest = hashlib.sha1(json.dumps([identity, data]).encode()).hexdigest()[:8]
    return work / split / f"{row.key}-s{seed}-{digest}"


def _recorded_command(row: Row, seed: int, files: dict[str, Path], directory: Path, extra: Sequence[str]) -> str:
    return " ".join(["convret", *train_command(row, seed, files, directory / "train", extra)[3:]])


def _weights(command: str) -> list[float]:
    """The mixture weights of a recorded training command (``[]`` for a single ``--train_file``)."""
    argv = command.split()
    if "--train_files" not in argv:
        return []
    return [float(item.rsplit(":", 1)[1]) for item in argv[argv.index("--train_files") + 1].split(",")]


def _finished_run(row: Row, seed: int, files: dict[str, Path], work: Path, split: str,
                  extra: Sequence[str]) -> dict[str, Any] | None:
    """The record of this run when it is complete: in its directory, or in the directory of the legacy hash when
    that run's recorded command has this run's weights (the rest is in the legacy hash; the paths may differ:
    a work directory moved)."""
    directory = run_directory(work, split, row, seed, files, extra)
    if (directory / "run.json").is_file():
        return json.loads((directory / "run.json").read_text(encoding="utf-8"))
    old = run_directory(work, split, row, seed, files, extra, legacy=True)
    if (old / "run.json").is_file():
        record = json.loads((old / "run.json").read_text(encoding="utf-8"))
        if _weights(record.get("command", "")) == _weights(_recorded_command(row, seed, files, old, extra)):
            return record
    return None


def one_run(row: Row, seed: int, files: dict[str, Path], args, children: Children) -> dict[str, Any]:
    extra = args.train_args.split()
    directory = run_directory(Path(args.work), args.split, row, seed, files, extra)
    record_path = directory / "run.json"
    finished = _finished_run(row, seed, files, Path(args.work), args.split, extra)
    if finished is not None:
        return finished
    command = train_command(row, seed, files, directory / "train", extra)
    train_time = children.run(command, directory / "train.log")
    evaluation = directory / "eval"
    eval_time = children.run(evaluate_command(directory / "train" / "final", evaluation, files, args.split),
                             directory / "eval.log")
    results = json.loads((evaluation / "results.json").read_text(encoding="utf-8"))
    record = {"row": row.key, "seed": seed, "directory": str(directory),
              "command": _recorded_command(row, seed, files, directory, extra), "train": train_time,
              "evaluate": eval_time, "load_average_after": list(os.getloadavg()), **measures(results)}
    H.write_json(record_path, record)
    return record


def measures(results: dict[str, Any]) -> dict[str, Any]:
    """NDCG@3 of each row of an evaluation, the session's fraction of the rewrite, and the diagnostics."""
    names = {"model": "session", "model, current utterance only": "utterance", "model, manual rewrite": "rewrite"}
    qrels = _qrels(results["qrels"])
    out: dict[str, Any] = {"ndcg_cut_3": {}, "diagnostics": {}}
    for row in results["rows"]:
        name = names.get(row["name"])
        if name is None:
            continue
        out["ndcg_cut_3"][name] = row["measures"]["ndcg_cut_3"]
        out["diagnostics"][name] = diagnostics(qrels, _run(row["run"]))
    ndcg = out["ndcg_cut_3"]
    out["session_over_rewrite"] = ndcg["session"] / ndcg["rewrite"] if ndcg.get("rewrite") else None
    if results.get("robustness"):
        out["robustness"] = {"mean": results["robustness"]["mean"], "std": results["robustness"]["std"]}
    return out


def _qrels(path: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                qid, _, doc, grade = line.split()
                qrels.setdefault(qid, {})[doc] = int(grade)
    return qrels


def _run(path: str) -> dict[str, list[str]]:
    ranked: dict[str, list[tuple[int, str]]] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                qid, _, doc, rank, *_ = line.split()
                ranked.setdefault(qid, []).append((int(rank), doc))
    return {qid: [doc for _, doc in sorted(docs)] for qid, docs in ranked.items()}


def _twins() -> dict[str, str]:
    """Entity prefix (``sw0016``) -> its near-duplicate's (``sw0017``) in the sample world."""
    world = _world()
    twin = world.World(world.WorldSizes(), world.SEED).twin
    return {f"sw{a:04d}": f"sw{b:04d}" for a, b in twin.items()}


_TWINS: dict[str, str] | None = None


def diagnostics(qrels: dict[str, dict[str, int]], run: dict[str, list[str]]) -> dict[str, float]:
    """Shares of the judged turns: the gold passage (grade 2) at rank 1; a passage of the right entity at rank
    1; the near-duplicate entity's passage of the same attribute above the gold one; and the mean number of the
    entity's other passages (grade 1) among the top 3."""
    global _TWINS
    if _TWINS is None:
        _TWINS = _twins()
    gold_first = entity_first = twin_above = grade1_top3 = 0
    judged = 0
    for qid, grades in qrels.items():
        golds = [doc for doc, grade in grades.items() if grade == 2]
        if not golds:
            continue
        judged += 1
        gold = golds[0]
        entity, attribute = gold.split("-")
        twin = f"{_TWINS.get(entity, entity)}-{attribute}"
        ranking = run.get(qid, [])
        position = {doc: i for i, doc in enumerate(ranking)}
        missing = len(ranking) + 1
        gold_first += position.get(gold, missing) == 0
        entity_first += bool(ranking) and ranking[0].split("-")[0] == entity
        twin_above += position.get(twin, missing) < position.get(gold, missing)
        grade1_top3 += sum(grades.get(doc) == 1 for doc in ranking[:3])
    judged = max(judged, 1)
    return {"gold_at_1": gold_first / judged, "entity_at_1": entity_first / judged,
            "twin_above_gold": twin_above / judged, "grade1_in_top3": grade1_top3 / judged}


# ------------------------------------------------------------------------------------------------ report
def summarize(rows: Sequence[Row], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: mean and population std over its seeds of every figure."""
    out = []
    for row in rows:
        runs = [r for r in records if r["row"] == row.key]
        if not runs:
            continue

        def stats(values: Iterable[float]) -> dict[str, float]:
            values = list(values)
            return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "values": values}

        summary: dict[str, Any] = {"row": row.key, "label": row.label, "seeds": [r["seed"] for r in runs],
                                   "ndcg_cut_3": {k: stats(r["ndcg_cut_3"][k] for r in runs)
                                                  for k in runs[0]["ndcg_cut_3"]},
                                   "session_over_rewrite": stats(r["session_over_rewrite"] for r in runs),
                                   "diagnostics": {name: {k: stats(r["diagnostics"][name][k] for r in runs)
                                                          for k in runs[0]["diagnostics"][name]}
                                                   for name in runs[0]["diagnostics"]},
                                   "train_wall_s": stats(r["train"]["wall_s"] for r in runs),
                                   "train_cpu_s": stats(r["train"]["cpu_s"] for r in runs)}
        out.append(summary)
    return out


def _ms(stat: dict[str, float], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_report(payload: dict[str, Any]) -> str:
    lines = H.report_header(payload)
    split = payload["config"]["split"]
    lines += [f"Split: {split} ({'the evaluation set' if split == 'eval' else 'held-out training sessions'}); "
              f"seeds {payload['config']['seeds']}; extra train flags: `{payload['config']['train_args'] or '-'}`. "
              "NDCG@3 mean ± std (population) over the seeds; each row adds one part to the row above.", ""]
    table = []
    for s in payload["summary"]:
        d = s["diagnostics"]["session"]
        table.append([s["label"], _ms(s["ndcg_cut_3"]["session"]), _ms(s["ndcg_cut_3"]["utterance"]),
                      _ms(s["ndcg_cut_3"]["rewrite"]), _ms(s["session_over_rewrite"], 2),
                      f"{d['gold_at_1']['mean']:.2f}", f"{d['twin_above_gold']['mean']:.3f}",
                      f"{d['grade1_in_top3']['mean']:.2f}", f"{s['train_wall_s']['mean']:.0f} / "
                      f"{s['train_cpu_s']['mean']:.0f}"])
    lines.append(H.markdown_table(
        ["recipe", "session", "current utterance", "manual rewrite", "session / rewrite",
         "gold @1 (session)", "twin above gold (session)", "grade-1 in top 3 (session)",
         "train wall / CPU s"], table))
    lines += ["", "Per seed (NDCG@3):", ""]
    per_seed = [[r["row"], r["seed"], f"{r['ndcg_cut_3']['session']:.3f}", f"{r['ndcg_cut_3']['utterance']:.3f}",
                 f"{r['ndcg_cut_3']['rewrite']:.3f}", f"{r['session_over_rewrite']:.2f}"]
                for r in payload["runs"]]
    lines.append(H.markdown_table(["row", "seed", "session", "current utterance", "manual rewrite",
                                   "session / rewrite"], per_seed))
    return "\n".join(lines)


def run(args, argv: list[str]) -> int:
    if args.list_rows:
        for title, rows in (("ablation (the default rows)", ROWS), ("alternatives (--rows KEY)", ALTERNATIVES)):
            print(f"{title}:")
            for row in rows:
                print(f"  {row.key:10s} {row.label}\n             data: {row.data()}; flags: {row.train_flags()}")
        return 0
    apply_presets(args)
    if args.device != "cpu":
        raise SystemExit("convret bench recipe: CPU only (the demo's recipe trains with use_cpu)")
    rows, seeds = selected_rows(args.rows), parse_seeds(args.seeds)
    args.work = args.work or str(Path(args.out) / "recipe-work")
    work = Path(args.work).resolve()
    args.work = str(work)
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
    children = Children(threads)
    payload: dict[str, Any] = {"command": H.command_line("convret bench", argv), "environment": H.environment("cpu"),
                               "config": {"rows": [dataclasses.asdict(r) for r in rows], "seeds": seeds,
                                          "split": args.split, "train_args": args.train_args, "work": str(work),
                                          "jobs": args.jobs, "child_threads": threads,
                                          "mine": {"retriever": "bm25", "window": MINE_WINDOW,
                                                   "num_negatives": MINE_NEGATIVES, "seed": MINE_SEED}},
                               "plots": []}
    files = prepare_data(work, args.split, children)
    jobs = [(row, seed) for row in rows for seed in seeds]
    bar = H.progress(range(len(jobs)), "recipe runs")
    steps = iter(bar)

    def job(item: tuple[Row, int]) -> dict[str, Any]:
        record = one_run(item[0], item[1], files, args, children)
        next(steps, None)
        return record

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        payload["runs"] = list(pool.map(job, jobs))
    payload["summary"] = summarize(rows, payload["runs"])
    payload["load_average_after"] = list(os.getloadavg())
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0
