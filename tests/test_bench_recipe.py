"""`convret bench recipe`: its rows, the training commands they make, the held-out validation split, the error
diagnostics and the report, without training (the runs are stood in for; `--smoke` trains for real and is too
slow for the suite)."""
import dataclasses
import json

import pytest

from convret.bench import recipe
from convret.cli import main
from convret.data import sample_world


def test_list_rows_prints_the_ablation_then_the_alternatives(capsys):
    assert main(["bench", "recipe", "--list-rows"]) == 0
    out = capsys.readouterr().out
    ablation, alternatives = out.split("alternatives")
    for row in recipe.ROWS:
        assert f"  {row.key} " in ablation
    for row in recipe.ALTERNATIVES:
        assert f"  {row.key} " in alternatives
    assert recipe.ROWS[0].key == "before"


def test_unknown_row_is_refused_naming_the_rows():
    with pytest.raises(SystemExit, match="unknown row.*nope.*before"):
        recipe.selected_rows("before,nope")


def test_train_command_names_one_file_or_the_mixture(tmp_path):
    files = {"bundled": tmp_path / "b.jsonl", "bm25": tmp_path / "m.jsonl", "adhoc": tmp_path / "a.jsonl"}
    single = recipe.train_command(recipe.ROWS[0], 3, files, "OUT", ["--max_steps", "7"])
    assert single[single.index("--train_file") + 1] == str(files["bundled"])
    assert single[single.index("--seed") + 1] == single[single.index("--init_seed") + 1] == "3"
    assert single[single.index("--sample_negatives") + 1] == "true" and single[-2:] == ["--max_steps", "7"]
    mixed = next(row for row in recipe.ROWS if len(row.sources) > 1)
    command = recipe.train_command(mixed, 0, files, "OUT", [])
    assert "--train_file" not in command
    expected = ",".join(f"{files[key]}:{weight:g}" for key, weight in mixed.sources)
    assert command[command.index("--train_files") + 1] == expected


def test_validation_split_holds_out_every_tenth_session(tmp_path):
    source = sample_world.SAMPLE_WORLD_DIR
    sessions = source / sample_world.TRAIN_ULTRACHAT
    out = recipe.validation_split(tmp_path, source, {"bundled": sessions})
    kept = [json.loads(line)["conv_id"] for line in out["bundled"].read_text().splitlines()]
    every = [json.loads(line)["conv_id"] for line in sessions.read_text().splitlines()]
    held = [conv for conv in every if conv not in kept]
    assert held == [f"t{i:04d}" for i in range(9, len(every), 10)]
    conversations = json.loads(out["conversations"].read_text())
    assert [c["conv_id"] for c in conversations] == held
    triplets = [json.loads(line) for line in (source / sample_world.TRAIN_TRIPLETS).read_text().splitlines()]
    held_turns = [t for t in triplets if t["Conversation_no"] in held]
    assert sum(len(c["turns"]) for c in conversations) == len(held_turns)
    qrels = {}
    for line in out["qrels"].read_text().splitlines():
        qid, _, doc, grade = line.split()
        qrels.setdefault(qid, {})[doc] = int(grade)
    first = held_turns[0]
    grades = qrels[f"{first['Conversation_no']}_{first['Turn_no']}"]
    gold = first["Gold_passage"]["id"]
    assert grades.pop(gold) == 2
    assert grades and all(g == 1 and doc.split("-")[0] == gold.split("-")[0] for doc, g in grades.items())


def test_validation_split_drops_the_held_out_sessions_of_topiocqa_style_files_too(tmp_path):
    """A TopiOCQA-style training file (one turn a record, ``Conversation_no``) loses every turn of the held-out
    sessions and keeps every other turn, in order."""
    source = sample_world.SAMPLE_WORLD_DIR
    triplets = source / sample_world.TRAIN_TRIPLETS
    out = recipe.validation_split(tmp_path, source, {"triplets": triplets})
    every = triplets.read_text().splitlines()
    kept = out["triplets"].read_text().splitlines()
    assert kept == [line for line in every if not recipe.held_out(json.loads(line)["Conversation_no"])]
    assert 0 < len(kept) < len(every)
    held = {c["conv_id"] for c in json.loads(out["conversations"].read_text())}
    assert not {json.loads(line)["Conversation_no"] for line in kept} & held


def test_run_directory_tells_apart_configs_named_by_extra_flags(tmp_path):
    """Two runs whose extra flags differ only in the content of a named file (a model config) get their own
    directories; the same content at another path, and the training files' own paths, do not matter."""
    files = {"bundled": tmp_path / "b.jsonl"}
    files["bundled"].write_text("{}\n")
    row = recipe.ROWS[0]
    (tmp_path / "l2.json").write_text('{"num_hidden_layers": 2}')
    (tmp_path / "l4.json").write_text('{"num_hidden_layers": 4}')
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "l2.json").write_text('{"num_hidden_layers": 2}')

    def directory(config):
        return recipe.run_directory(tmp_path / "work", "validation", row, 0, files, ["--model_config", str(config)])

    assert directory(tmp_path / "l2.json") != directory(tmp_path / "l4.json")
    assert directory(tmp_path / "l2.json") == directory(tmp_path / "copy" / "l2.json")
    assert recipe.run_directory(tmp_path / "work", "validation", row, 0, files, ["--max_steps", "7"]) != \
        recipe.run_directory(tmp_path / "work", "validation", row, 0, files, ["--max_steps", "8"])


def test_run_directory_changes_with_the_weights_and_finds_runs_made_before_they_counted(tmp_path):
    """Weights sit in the --train_files argument beside the (masked) paths: two mixtures of the same files are
    two runs. A run finished under the legacy hash is reused only when its recorded command has these weights
    (its paths may be another work directory's)."""
    files = {"bm25": tmp_path / "m.jsonl", "adhoc": tmp_path / "a.jsonl"}
    for path in files.values():
        path.write_text("{}\n")
    mixed = next(row for row in recipe.ROWS if len(row.sources) == 2)
    other = dataclasses.replace(mixed, sources=((mixed.sources[0][0], 0.5), (mixed.sources[1][0], 0.5)))
    work = tmp_path / "work"
    assert recipe.run_directory(work, "eval", mixed, 0, files, []) != \
        recipe.run_directory(work, "eval", other, 0, files, [])
    legacy = recipe.run_directory(work, "eval", mixed, 0, files, [], legacy=True)
    assert legacy == recipe.run_directory(work, "eval", other, 0, files, [], legacy=True)  # the old collision
    legacy.mkdir(parents=True)
    record = {"row": mixed.key, "command": recipe._recorded_command(mixed, 0, files, legacy, []).replace(
        str(tmp_path), "/elsewhere")}
    (legacy / "run.json").write_text(json.dumps(record))
    assert recipe._finished_run(mixed, 0, files, work, "eval", []) == record
    assert recipe._finished_run(other, 0, files, work, "eval", []) is None


def test_diagnostics_against_hand_counts():
    twins = recipe._twins()
    entity, twin = next(iter(twins.items()))
    qrels = {"q1": {f"{entity}-2": 2, f"{entity}-0": 1, f"{entity}-1": 1},
             "q2": {f"{entity}-3": 2, f"{entity}-4": 1}}
    run = {"q1": [f"{entity}-2", f"{entity}-0", f"{entity}-1"],           # gold first, two grade-1 in the top 3
           "q2": [f"{twin}-3", f"{entity}-4", "sw9999-0", f"{entity}-3"]}  # the twin above the gold, one grade-1
    d = recipe.diagnostics(qrels, run)
    assert d == {"gold_at_1": 0.5, "entity_at_1": 0.5, "twin_above_gold": 0.5, "grade1_in_top3": 1.5}


def test_report_has_a_row_per_part_and_a_line_per_seed(tmp_path, monkeypatch):
    """The runs stood in for: mean and population std per row, every seed in its own line."""
    session = {"before": [0.4, 0.5], "mined": [0.6, 0.8]}

    def fake_run(row, seed, files, args, children):
        value = session[row.key][seed]
        diag = {"gold_at_1": 0.1, "entity_at_1": 0.2, "twin_above_gold": 0.3, "grade1_in_top3": 0.4}
        return {"row": row.key, "seed": seed, "ndcg_cut_3": {"session": value, "utterance": 0.2, "rewrite": 1.0},
                "session_over_rewrite": value, "diagnostics": {n: diag for n in ("session", "utterance", "rewrite")},
                "train": {"wall_s": 10.0, "cpu_s": 20.0}, "evaluate": {"wall_s": 1.0, "cpu_s": 1.0}}

    monkeypatch.setattr(recipe, "one_run", fake_run)
    monkeypatch.setattr(recipe, "prepare_data", lambda work, split, children: {})
    assert main(["bench", "recipe", "--rows", "before,mined", "--seeds", "0,1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "recipe.json").read_text())
    mined = next(s for s in payload["summary"] if s["row"] == "mined")
    assert mined["ndcg_cut_3"]["session"]["mean"] == pytest.approx(0.7)
    assert mined["ndcg_cut_3"]["session"]["std"] == pytest.approx(0.1)
    report = (tmp_path / "recipe.md").read_text()
    assert "0.700 ± 0.100" in report and "0.450 ± 0.050" in report
    assert "| mined | 1 | 0.800 |" in report


def test_the_last_row_is_what_make_demo_trains():
    """The ablation's last row and `make demo` train the same recipe: the Makefile's sources and weights, and
    every flag of the row either on the Makefile's command line or the embedded default's value (tiny.yaml, then
    the argument's own default)."""
    import shlex
    import subprocess
    from pathlib import Path

    import yaml

    from convret.train.arguments import DataArguments

    root = Path(__file__).resolve().parents[1]
    printed = subprocess.run(["make", "-n", "demo", "PYTHON=python"], cwd=root, capture_output=True, text=True,
                             check=True).stdout
    line = next(line for line in printed.splitlines() if " convret train " in line)
    argv = shlex.split(line)
    flags = {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    names = {"train.bm25.jsonl": "bm25", "train_triplets.bm25.jsonl": "triplets", "train_adhoc.bm25.jsonl": "adhoc"}
    sources = []
    for item in flags.pop("train_files").split(","):
        path, weight = item.rsplit(":", 1)
        sources.append((names[Path(path).name], float(weight)))
    demo = recipe.ROWS[-1]
    assert tuple(sources) == demo.sources
    tiny = yaml.safe_load((root / "src/convret/resources/configs/tiny.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(DataArguments)}
    for key, value in demo.train_flags().items():
        if key in flags:
            assert flags.pop(key) == (str(value).lower() if isinstance(value, bool) else str(value)), key
        else:
            assert tiny.get(key, defaults.get(key)) == value, key
    assert set(flags) == {"output_dir"}, f"make demo sets flags the row does not: {flags}"
