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
          "--max_steps", str(STEPS), "--save_steps", "100", "--learning_rate", "2e-3", "--warmup_steps", "0",
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


def _needs(engine: str) -> None:
    if engine.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")


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
def test_two_processes_under_the_engine_equal_one_process(world, reference, tmp_path, engine, mode):
    _needs(engine)
    out = tmp_path / f"{engine}-{mode}"
    _check_finished(_torchrun(world, out, engine, mode))
    _engine_report(out, engine)
    _assert_same_training(reference(mode), out, mode)
