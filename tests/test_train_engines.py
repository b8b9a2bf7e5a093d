"""The engines of ``convret train`` (FSDP2, DeepSpeed ZeRO-2 and ZeRO-3) with real torchrun processes on CPU (gloo).

Every case is proven against one process on the global batch (no engine): 2 processes x 4 examples under the
engine against 1 process x 8, 3 steps, dropout 0, fp32: the loss of every step (log.jsonl) within a relative 1e-5
and the final weights within a relative 1e-4 per tensor (full fine-tuning: every tensor of model.safetensors;
LoRA: the adapter's tensors, LoRA matrices and the summary tokens' trainable rows). In the first step the second
rank's batch holds no retrieval example (LM-only examples), so every collective must still be entered. Each run
also reports, per rank, the engine in force (``is_fsdp_enabled`` / ``is_deepspeed_enabled``, accelerate's
distributed type, the class of ``model_wrapped``) and how many of the model's parameters the rank holds: a
requested engine never silently becomes DDP.

One case per engine runs in ``make test``; the others carry the ``engines`` marker and run with
``make test-engines`` (``pytest --engines``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tiny import word_tokenizer
from _train_world import WordFormatter, make_examples, tiny_model_config

DRIVER = Path(__file__).resolve().parent / "_train_driver.py"
LM_ONLY = [4, 5, 6, 7]  # the second rank's whole first batch under sequential sampling
STEPS = 3
COMMON = ["--max_session_len", "48", "--max_passage_len", "16", "--max_response_len", "16", "--num_negatives", "2",
          "--max_steps", str(STEPS), "--save_steps", "2", "--learning_rate", "2e-3", "--warmup_steps", "0",
          "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--temperature", "0.05",
          "--train_sampling_strategy", "sequential", "--seed", "5", "--dataloader_num_workers", "0",
          "--logging_steps", "1"]
# full fine-tuning trains the CSIT recipe, LoRA (with the summary tokens' rows) the UniConv recipe on triplets
MODES = {
    "full": ["--recipe", "csit"],
    "lora": ["--recipe", "uniconv", "--lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
             "--lora_target_modules", "q_proj", "v_proj"],
}
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4
HAS_DEEPSPEED = True
try:
    import deepspeed as _deepspeed  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs it
    HAS_DEEPSPEED = False


def _engine_flags(engine: str, directory: Path) -> list[str]:
    if engine == "fsdp2":
        return ["--fsdp", "--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})]
    stage = int(engine[-1])
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}
    if stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    path = directory / f"ds-{engine}.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed", str(path)]


def _below_requirement(engine: str) -> str | None:
    """Why this environment's versions are below what ``engine`` needs (convret refuses it), or ``None``."""
    import importlib.metadata

    from packaging.version import Version

    from convret.train.engines import ENGINE_VERSIONS

    for package, minimum in ENGINE_VERSIONS["fsdp2" if engine == "fsdp2" else "deepspeed"].items():
        try:
            if Version(importlib.metadata.version(package)) < Version(minimum):
                return f"{package} < {minimum}"
        except importlib.metadata.PackageNotFoundError:
            return f"{package} is not installed"
    return None


def _needs(engine: str) -> None:
    if engine.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    below = _below_requirement(engine)
    if below:
        pytest.skip(f"{below}: convret refuses {engine} here (test_engine_requests_that_cannot_run_are_refused...)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines-world")
    tok = word_tokenizer()
    tok.save_pretrained(root / "tok")
    tiny_model_config(root / "model.json", len(tok) + 8)
    return root


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """``reference(mode, *flags) -> Path``: one process on the global batch of 8, no engine (built once)."""
    done: dict[tuple, Path] = {}

    def get(mode: str, *flags: str) -> Path:
        key = (mode, *flags)
        if key not in done:
            from convret.train.arguments import parse_arguments
            from convret.train.main import run
            from convret.train.model import build_model

            out = tmp_path_factory.mktemp(f"reference-{mode}")
            m, d, l, t = parse_arguments(["--model_config", str(world / "model.json"), "--tokenizer_name_or_path",
                                          str(world / "tok"), *COMMON, *MODES[mode], "--output_dir", str(out),
                                          "--per_device_train_batch_size", "8", *flags])
            built = build_model(m, d, l)
            examples = make_examples(24, negatives=2, lm_only=LM_ONLY, triplets=mode == "lora")
            assert run(m, d, l, t, examples=examples, formatter=WordFormatter(built.tokenizer), built=built) == 0
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="module")
def engine_run(world, tmp_path_factory):
    """``engine_run(engine, mode, *flags) -> Path``: the output directory of a finished 2-process run (run once
    per module, shared by the tests that compare against it)."""
    done: dict[tuple, Path] = {}

    def get(engine: str, mode: str, *flags: str) -> Path:
        key = (engine, mode, *flags)
        if key not in done:
            out = tmp_path_factory.mktemp(f"run-{engine}-{mode}") / "out"
            _check_finished(_torchrun(world, out, engine, mode, *flags))
            done[key] = out
        return done[key]

    return get


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(world: Path, out: Path, engine: str, mode: str, *flags: str, nproc: int = 2, env: dict | None = None,
              launcher: list[str] | None = None, batch: int = 4, wait: bool = True, timeout: int = 600):
    """``torchrun`` of the test driver under ``engine`` (``"ddp"``: none); returns the finished process."""
    engine_flags = [] if engine == "ddp" else _engine_flags(engine, out.parent)
    launcher = launcher or ["--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(DRIVER), str(world), "--examples", "24",
           "--lm-only", ",".join(map(str, LM_ONLY)), *(["--triplets"] if mode == "lora" else []), "--",
           *COMMON, *MODES[mode], *engine_flags, "--output_dir", str(out), "--per_device_train_batch_size",
           str(batch), "--ddp_backend", "gloo", *flags]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CONVRET_TEST_ENGINE_REPORT": str(out) + "-report",
                **(env or {})}
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.wait(timeout)
    return proc


def _check_finished(proc) -> None:
    assert proc.returncode == 0, proc.stderr.read()[-6000:]


def _engine_report(out: Path, engine: str, ranks: int = 2) -> list[dict]:
    reports = [json.loads((Path(str(out) + "-report") / f"rank-{r}.json").read_text()) for r in range(ranks)]
    for report in reports:
        assert report["world_size"] == ranks
        if engine == "fsdp2":
            assert report["is_fsdp_enabled"] and not report["is_deepspeed_enabled"], report
            assert report["distributed_type"] == "DistributedType.FSDP", report
            assert report["model_wrapped"].startswith("FSDP"), report  # fully_shard's FSDP<Model> class
        else:
            assert report["is_deepspeed_enabled"] and not report["is_fsdp_enabled"], report
            assert report["distributed_type"] == "DistributedType.DEEPSPEED", report
            assert report["model_wrapped"] == "DeepSpeedEngine", report
        sharded = engine in ("fsdp2", "zero3")
        # FSDP2 / ZeRO-3: each rank holds about half of the parameters; ZeRO-2: all of them (its optimizer states
        # and gradients are the sharded part)
        share = report["local_params"] / report["total_params"]
        assert (0.4 < share < 0.65) if sharded else share == 1.0, report
    return reports


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line][:STEPS]


def _weights(directory: Path, mode: str) -> dict[str, torch.Tensor]:
    return load_file(directory / ("model.safetensors" if mode == "full" else "adapter_model.safetensors"))


def _assert_same_training(ref: Path, out: Path, mode: str, what: str = "final") -> None:
    a, b = _losses(ref), _losses(out)
    assert len(a) == len(b) == STEPS, (a, b)
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= LOSS_RTOL * abs(x), f"step {step}: loss {x} (one process) vs {y}"
    wa, wb, init = _weights(ref / what, mode), _weights(out / what, mode), _weights(ref / "init", mode)
    assert wa.keys() == wb.keys()
    moved = max(float((wa[k] - init[k]).abs().max()) for k in wa if k in init)
    assert moved > 1e-3, "training did not move the weights: the comparison could not fail"
    # the key bias's gradient is zero in exact arithmetic (a constant added to every key shifts all scores of a
    # query equally), so it is round-off that Adam normalises: compared only within the global norm
    errors = {k: float((wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-12)) for k in wa}
    worst = max((e, k) for k, e in errors.items() if "k_proj.bias" not in k)
    assert worst[0] <= WEIGHT_RTOL, f"{worst[1]}: relative difference {worst[0]:.2e}"
    flat_a = torch.cat([wa[k].reshape(-1) for k in wa])
    flat_b = torch.cat([wb[k].reshape(-1) for k in wa])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) <= WEIGHT_RTOL


# one case per engine in `make test`, the rest under the marker
CASES = [
    pytest.param("fsdp2", "full", id="fsdp2-full"),
    pytest.param("zero2", "lora", id="zero2-lora"),
    pytest.param("zero3", "full", id="zero3-full"),
    pytest.param("fsdp2", "lora", id="fsdp2-lora", marks=pytest.mark.engines),
    pytest.param("zero2", "full", id="zero2-full", marks=pytest.mark.engines),
    pytest.param("zero3", "lora", id="zero3-lora", marks=pytest.mark.engines),
]


@pytest.mark.parametrize("engine,mode", CASES)
def test_two_processes_under_the_engine_equal_one_process(reference, engine_run, engine, mode):
    """Same losses and weights as one process; the engine in force is the one asked for; checkpoint-2 holds the
    engine's own training state (sharded per rank) and consolidated retriever files that load like any other."""
    _needs(engine)
    out = engine_run(engine, mode)
    _engine_report(out, engine)
    ref = reference(mode)
    _assert_same_training(ref, out, mode)
    _assert_sharded_state(out / "checkpoint-2", engine)
    assert json.loads((out / "checkpoint-2" / "convret_config.json").read_text())["extra"]["engine"] == engine
    _assert_same_training(ref, out, mode, what="checkpoint-2")
    _assert_loads_like_any_checkpoint(ref / "final", out / "final")


def _assert_sharded_state(checkpoint: Path, engine: str) -> None:
    """The Trainer's engine state, written by every rank (2 ranks)."""
    names = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    if engine == "fsdp2":  # torch.distributed.checkpoint shards (SHARDED_STATE_DICT)
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert {f"{part}/__0_0.distcp", f"{part}/__1_0.distcp", f"{part}/.metadata"} <= names, sorted(names)
    else:
        step = checkpoint.name.split("-")[1]
        optim = {f"global_step{step}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
        model = ({f"global_step{step}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
                 if engine == "zero3" else {f"global_step{step}/mp_rank_00_model_states.pt"})
        assert optim | model <= names, sorted(names)
    assert "convret_config.json" in names and ("model.safetensors" in names or "adapter_model.safetensors" in names)


def _assert_loads_like_any_checkpoint(reference_final: Path, final: Path) -> None:
    """``final/`` of the engine run through the loading step of encode / evaluate / serve (``Encoder``) and through
    ``convret export`` (sentence-transformers): the embeddings of the one-process run's ``final/``."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from convret.data.records import Turn
    from convret.retrieval.encoder import Encoder
    from convret.retrieval.export import export_sentence_transformers

    passages = ["w1 w2 w3 the", "w44 w7", "tell me about w9 w10 w11"]
    sessions = [([Turn("user", "tell me about w3"), Turn("assistant", "w3 w51")], "the w44"), ([], "the w12")]
    expected = Encoder.from_checkpoint(reference_final)
    encoder = Encoder.from_checkpoint(final)
    got_p, got_s = encoder.encode_passages(passages), encoder.encode_sessions(sessions)
    np.testing.assert_allclose(got_p, expected.encode_passages(passages), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got_s, expected.encode_sessions(sessions), rtol=0, atol=1e-4)
    # a LoRA checkpoint exports merged: unmerged export needs a newer peft than the oldest convret supports
    lora = (final / "adapter_config.json").is_file()
    exported = export_sentence_transformers(final, final.parent / "st", merge=lora)
    st = SentenceTransformer(str(exported), device="cpu")
    np.testing.assert_allclose(st.encode(passages, convert_to_numpy=True), got_p, rtol=1e-4, atol=1e-5)


GRADCACHE = [
    pytest.param("fsdp2", id="fsdp2", marks=pytest.mark.engines),
    pytest.param("zero2", id="zero2", marks=pytest.mark.engines),
    pytest.param("zero3", id="zero3", marks=pytest.mark.engines),
]


@pytest.mark.parametrize("engine", GRADCACHE)
def test_gradcache_under_the_engine_equals_one_process(world, reference, tmp_path, engine):
    """GradCache (chunks of one packed row: a batch of 2 examples packs into 1 or 2 rows) with gradient accumulation 2 under the engine: 2 processes x 2 examples x
    2 accumulation steps against one process x 4 x 2 without GradCache. Under DeepSpeed the chunks are the engine's
    accumulation micro-steps (boundary and optimizer step only after the last chunk of the last micro-batch)."""
    _needs(engine)
    accumulation = ["--gradient_accumulation_steps", "2"]
    out = tmp_path / f"{engine}-gradcache"
    _check_finished(_torchrun(world, out, engine, "full", *accumulation, "--gradcache_chunk_rows", "1", batch=2))
    _engine_report(out, engine)
    _assert_same_training(reference("full", "--per_device_train_batch_size", "4", *accumulation), out, "full")


RESUME = [
    pytest.param("fsdp2", "lora", id="fsdp2-lora", marks=pytest.mark.engines),
    pytest.param("zero2", "full", id="zero2-full", marks=pytest.mark.engines),
    pytest.param("zero3", "lora", id="zero3-lora", marks=pytest.mark.engines),
]


@pytest.mark.parametrize("engine,mode", RESUME)
def test_sigkill_during_a_save_then_resume_is_exact(world, engine_run, tmp_path, engine, mode):
    """Every rank killed with SIGKILL in the middle of saving checkpoint-2 (its sharded state written, not renamed);
    ``--resume auto`` continues from checkpoint-1 (the engine's sharded model and optimizer state, scheduler, RNG,
    data position): the losses of the steps trained again and the final weights are those of the uninterrupted run
    under the same engine (max abs difference <= 1e-6)."""
    _needs(engine)
    flags = ("--save_steps", "1")
    uninterrupted = engine_run(engine, mode, *flags)
    out = tmp_path / "killed"
    killed = _torchrun(world, out, engine, mode, *flags, env={"CONVRET_TEST_KILL_IN_SAVE": "2"})
    assert killed.returncode != 0
    assert (out / ".staging-2").is_dir() and (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    _check_finished(_torchrun(world, out, engine, mode, *flags, "--resume", "auto"))
    a, b = _losses(uninterrupted), _losses(out)
    assert len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    wa, wb = _weights(uninterrupted / "final", mode), _weights(out / "final", mode)
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= 1e-6, diff
    _assert_sharded_state(out / "checkpoint-3", engine)
    if engine in ("fsdp2", "zero3"):  # killed after its last checkpoint: final/ comes from checkpoint-3's files
        import shutil

        shutil.rmtree(out / "final")
        _check_finished(_torchrun(world, out, engine, mode, *flags, "--resume", "auto"))
        again = _weights(out / "final", mode)
        assert max(float((wa[k] - again[k]).abs().max()) for k in wa) <= 1e-6


def test_two_nodes_equal_one_node(world, engine_run, tmp_path):
    """``torchrun --nnodes 2 --nproc_per_node 1`` with the c10d rendezvous on 127.0.0.1 (two "nodes" on one machine,
    each its own torchrun agent) under FSDP2: the same losses and weights as the one-node run with 2 processes
    (max abs difference <= 1e-6)."""
    one_node = engine_run("fsdp2", "full")
    out = tmp_path / "two-nodes"
    port = _free_port()
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                f"127.0.0.1:{port}", "--rdzv_id", f"convret-test-{port}"]
    agents = [_torchrun(world, out, "fsdp2", "full", launcher=launcher, wait=False) for _ in range(2)]
    for agent in agents:
        agent.wait(600)
        _check_finished(agent)
    reports = _engine_report(out, "fsdp2")
    assert sorted(r["node_rank"] for r in reports) == [0, 1] and {r["local_rank"] for r in reports} == {0}
    a, b = _losses(one_node), _losses(out)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    wa, wb = _weights(one_node / "final", "full"), _weights(out / "final", "full")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


# ---------------------------------------------------------------------------------------------- refusals (fast)
def _parsed(world, *flags):
    from convret.train.arguments import parse_arguments

    return parse_arguments(["--model_config", str(world / "model.json"), "--tokenizer_name_or_path",
                            str(world / "tok"), "--output_dir", str(world / "out"), *flags])


def test_engine_requests_that_cannot_run_are_refused_with_the_reason(world, tmp_path, monkeypatch):
    import importlib.metadata

    from convret.train.engines import EngineError, check_request

    def check(*flags, learnable=False, torchrun=True):
        *_, args = _parsed(world, *flags)  # parsed outside torchrun's environment (no process group here)
        if torchrun:
            monkeypatch.setenv("LOCAL_RANK", "0")
        try:
            return check_request(args, learnable_temperature=learnable), args
        finally:
            monkeypatch.delenv("LOCAL_RANK", raising=False)

    real_version = importlib.metadata.version

    def pretend(package, version):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: version if name == package else real_version(name))

    fsdp = ["--fsdp", "--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})]
    if _below_requirement("fsdp2"):  # an environment below FSDP2's needs (CI's oldest versions): the real refusal
        installed = real_version("accelerate")
        with pytest.raises(EngineError, match=f"fsdp2 engine needs accelerate >= 1.14 \\(installed: {installed}\\)"):
            check(*fsdp)
    else:
        engine, args = check(*fsdp)
        assert engine == "fsdp2"
        assert args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"  # convret's default: sharded saves
        pretend("accelerate", "1.13.0")
        with pytest.raises(EngineError, match="fsdp2 engine needs accelerate >= 1.14 \\(installed: 1.13.0\\)"):
            check(*fsdp)
        monkeypatch.setattr(importlib.metadata, "version", real_version)
    with pytest.raises(EngineError, match="FSDP2 \\(fully_shard\\) only"):
        check("--fsdp", "--fsdp_config", json.dumps({"version": 1}))
    with pytest.raises(EngineError, match="learnable_temperature is not supported under fsdp2"):
        check(*fsdp, learnable=True)
    with pytest.raises(EngineError, match="runs under torchrun"):
        check(*fsdp, torchrun=False)
    if not HAS_DEEPSPEED:
        return
    for config, message in [({"zero_optimization": {"stage": 0}}, "stage 0 is DDP"),
                            ({"zero_optimization": {"stage": 3}}, "stage3_gather_16bit_weights_on_model_save true")]:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(config))
        with pytest.raises(EngineError, match=message):
            check("--deepspeed", str(path))
    zero3 = _engine_flags("zero3", tmp_path)
    assert check(*zero3)[0] == "zero3"
    with pytest.raises(EngineError, match="exclude each other"):
        check(*zero3, *fsdp)
    pretend("deepspeed", "0.18.9")
    with pytest.raises(EngineError, match="needs deepspeed >= 0.19.8 \\(installed: 0.18.9\\)"):
        check(*zero3)


def test_resume_under_another_engine_is_refused(tmp_path):
    """A checkpoint records the engine that wrote it; resuming it under another one (whose Trainer would not find
    the optimizer state and restart AdamW from zero without a word) is refused."""
    from convret.train.engines import EngineError, check_resume_engine

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "convret_config.json").write_text(json.dumps({"extra": {"engine": "zero2", "global_step": 2}}))
    check_resume_engine(checkpoint, "zero2")
    for other in ("ddp", "fsdp2", "zero3"):
        with pytest.raises(EngineError, match=f"trained under zero2 .* resume it under zero2, not {other}"):
            check_resume_engine(checkpoint, other)
    (checkpoint / "convret_config.json").write_text(json.dumps({"extra": {"global_step": 2}}))  # older convret
    check_resume_engine(checkpoint, "fsdp2")


def test_single_process_engine_request_exits_with_the_reason(world, capsys, monkeypatch):
    from convret.train.main import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(["--model_config", str(world / "model.json"), "--tokenizer_name_or_path", str(world / "tok"),
                 "--output_dir", str(world / "single"), "--max_steps", "1", "--fsdp"]) == 2
    assert "the fsdp2 engine runs under torchrun" in capsys.readouterr().err
    assert not (world / "single" / "init").exists()


def test_verify_engine_refuses_any_other_engine():
    """The check behind every engine run: accelerate's distributed type, then the class of the prepared model."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from convret.train.engines import EngineError, verify_engine

    def accelerator(kind, version=2):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
            fsdp_version=version)))

    model = torch.nn.Linear(2, 2)
    ddp = type("DistributedDataParallel", (torch.nn.Module,), {})()
    with pytest.raises(EngineError, match="fsdp2 was requested but accelerate runs DistributedType.MULTI_CPU"):
        verify_engine("fsdp2", accelerator(DistributedType.MULTI_CPU))
    with pytest.raises(EngineError, match="model: DistributedDataParallel"):
        verify_engine("fsdp2", accelerator(DistributedType.FSDP), ddp)
    with pytest.raises(EngineError, match="runs DistributedType.FSDP"):
        verify_engine("fsdp2", accelerator(DistributedType.FSDP, version=1))
    with pytest.raises(EngineError, match="zero3 was requested"):
        verify_engine("zero3", accelerator(DistributedType.MULTI_CPU))
    engine = type("DeepSpeedEngine", (torch.nn.Module,), {"zero_optimization_stage": lambda self: 2})()
    with pytest.raises(EngineError, match="zero3 was requested.*DeepSpeedEngine"):
        verify_engine("zero3", accelerator(DistributedType.DEEPSPEED), engine)
    verify_engine("zero2", accelerator(DistributedType.DEEPSPEED), engine)
    verify_engine("ddp", accelerator(DistributedType.MULTI_CPU), model)


@pytest.mark.engines
def test_fsdp_that_accelerate_leaves_as_ddp_stops_the_run(world, tmp_path):
    """With convret's switch of accelerate's state turned off (CONVRET_TEST_NO_FSDP_SWITCH), accelerate keeps the
    CPU processes on DDP: the run stops with the reason before any step instead of training as DDP."""
    out = tmp_path / "no-switch"
    proc = _torchrun(world, out, "fsdp2", "full", env={"CONVRET_TEST_NO_FSDP_SWITCH": "1"})
    assert proc.returncode != 0
    assert "fsdp2 was requested but accelerate runs DistributedType.MULTI_CPU" in proc.stderr.read()
    assert not (out / "final").exists() and not (out / "log.jsonl").exists()


# ------------------------------------------------------------------------------------ memory arithmetic
def test_memory_plan_counts_the_real_7b_models_and_shards_by_engine():
    """The arithmetic's parameter counts equal the models' (built on the meta device; 7,615,616,512 is Qwen2-7B's
    published count), LoRA's trainable count
    equals PEFT's (plus the summary tokens' rows), and the per-rank model state follows each engine's layout."""
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    from convret.train.memory_plan import MISTRAL_7B, QWEN2_7B, lora_params, model_state

    import dataclasses

    assert (QWEN2_7B.params, MISTRAL_7B.params) == (7_615_616_512, 7_241_756_672)  # Qwen2-7B; Mistral-7B + 3 rows
    for full, model_type, extra in [(QWEN2_7B, "qwen2", {}), (MISTRAL_7B, "mistral", {})]:
        shape = dataclasses.replace(full, layers=2)  # the same layers, fewer of them: quicker to build
        config = AutoConfig.for_model(model_type, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                                      num_hidden_layers=shape.layers, num_attention_heads=shape.hidden // 128,
                                      num_key_value_heads=shape.kv_dim // 128, vocab_size=shape.vocab,
                                      tie_word_embeddings=False, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert shape.params == sum(p.numel() for p in model.parameters())
        lora = peft.get_peft_model(model, peft.LoraConfig(r=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "o_proj", "gate_proj", "up_proj",
                                                                                "down_proj"]))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        assert lora_params(shape, 32, summary_tokens=0) == trainable
    p, t = 1000, 100
    assert model_state("ddp", p, t, 8).model_state == 4 * p + 4 * t + 8 * t
    assert model_state("fsdp2", p, t, 8).model_state == (4 * p + 4 * t + 8 * t) // 8
    zero2, zero3 = model_state("zero2", p, t, 8), model_state("zero3", p, t, 8)  # bf16 module + fp32 master
    assert (zero2.parameters, zero2.gradients, zero2.optimizer) == (2 * p + 4 * t // 8, 2 * t // 8, 8 * t // 8)
    assert (zero3.parameters, zero3.gradients, zero3.optimizer) == (2 * p // 8 + 4 * t // 8, 2 * t // 8, 8 * t // 8)


@pytest.mark.engines
def test_bench_step_engine_memory_matches_the_arithmetic():
    """``convret bench step --engines all`` at tiny size: each rank's parameters and optimizer states, counted
    tensor by tensor, are what the arithmetic says (exactly), and under ZeRO-2 everything the process holds is the
    arithmetic's model state within 1 %."""
    from convret.bench.engine_memory import ENGINE_NAMES, measure

    engines = [e for e in ENGINE_NAMES if HAS_DEEPSPEED or not e.startswith("zero")]
    for record in measure(engines):
        assert record["status"] == "ok", record.get("error")
        predicted = record["predicted"]
        for rank in record["ranks"]:
            assert abs(rank["param_bytes"] - predicted["parameters"]) <= 1024, (record["engine"], rank)
            assert abs(rank["optimizer_bytes"] - predicted["optimizer"]) <= 1024, (record["engine"], rank)
            if record["engine"] == "zero2":
                assert abs(rank["tensors_bytes"] - predicted["model_state"]) <= 0.01 * predicted["model_state"]


# ------------------------------------------------------------------------------------- the bundled configs
ENGINE_CONFIGS = {"chatretriever-qwen-7b-fsdp2.yaml": ("fsdp2", "Qwen2DecoderLayer"),
                  "chatretriever-qwen-7b-zero3.yaml": ("zero3", None),
                  "uniconv-mistral-7b-fsdp2.yaml": ("fsdp2", "MistralDecoderLayer"),
                  "uniconv-mistral-7b-zero3.yaml": ("zero3", None)}


def test_bundled_engine_configs_request_their_engine(world, monkeypatch):
    """The 7B configs' FSDP2 / ZeRO-3 variants: the settings of their base config plus a valid engine request
    (the layer class FSDP2 wraps exists in the model family)."""
    import importlib

    from convret.train.arguments import CONFIG_DIR, load_config, parse_arguments
    from convret.train.engines import EngineError, check_request

    for name, (engine, layer) in ENGINE_CONFIGS.items():
        if engine.startswith("zero") and not HAS_DEEPSPEED:
            continue
        base = load_config(CONFIG_DIR / (name.rsplit("-", 1)[0] + ".yaml"))
        variant = load_config(CONFIG_DIR / name)
        assert {k: v for k, v in variant.items() if k not in ("fsdp", "fsdp_config", "deepspeed", "output_dir")} \
            == {k: v for k, v in base.items() if k != "output_dir"}, name
        *_, args = parse_arguments([], CONFIG_DIR / name)
        monkeypatch.setenv("LOCAL_RANK", "0")
        if _below_requirement(engine):
            with pytest.raises(EngineError, match=f"the {engine} engine needs"):
                check_request(args)
        else:
            assert check_request(args) == engine
        monkeypatch.delenv("LOCAL_RANK")
        if layer is not None:
            family = layer.removesuffix("DecoderLayer").lower()
            assert hasattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), layer)
            assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == layer


CONFIG_RUNS = [pytest.param(name, id=name.removesuffix(".yaml"), marks=pytest.mark.engines)
               for name in ("chatretriever-qwen-7b-fsdp2.yaml", "chatretriever-qwen-7b-zero3.yaml")]


@pytest.mark.parametrize("name", CONFIG_RUNS)
def test_bundled_engine_config_trains_at_tiny_size(world, tmp_path, name):
    """The config as shipped (LoRA r 32 with dropout, gradient checkpointing, gradient accumulation 4, the engine
    block, DeepSpeed's "auto" values) on 2 CPU processes with the tiny model: 2 optimizer steps, consolidated
    final/ loads."""
    from convret.train.arguments import CONFIG_DIR
    from convret.train.checkpoint import load_retriever

    import yaml

    from convret.train.arguments import load_config

    engine = ENGINE_CONFIGS[name][0]
    _needs(engine)
    out = tmp_path / "out"
    config = load_config(CONFIG_DIR / name)
    del config["model_name_or_path"], config["train_file"]  # the tiny model and the test world's data instead
    (tmp_path / name).write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(DRIVER), str(world), "--config", str(tmp_path / name), "--",
           "--model_config", str(world / "model.json"), "--tokenizer_name_or_path", str(world / "tok"),
           "--max_session_len", "48", "--max_passage_len", "16", "--max_response_len", "16",
           "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2",
           "--use_cpu", "true", "--ddp_backend", "gloo", "--report_to", "none", "--disable_tqdm", "true",
           "--dataloader_num_workers", "0", "--logging_steps", "1"]
    if engine == "fsdp2":
        cmd += ["--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
                                             "state_dict_type": "SHARDED_STATE_DICT"})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONVRET_TEST_ENGINE_REPORT": str(out) + "-report"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    _engine_report(out, engine)
    _assert_sharded_state(out / "checkpoint-2", engine)
    loaded = load_retriever(out / "final")
    assert loaded.config.adapter and loaded.config.extra["global_step"] == 2
