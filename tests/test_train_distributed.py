"""Two CPU processes (torchrun, gloo DDP) against one process on the concatenated global batch: 3 steps with
dropout 0 give the same weights (fp32, relative 1e-4). In step 1 the second rank's batch holds no retrieval
example (LM-only examples): it must still enter every collective (otherwise the run hangs)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from _tiny import word_tokenizer
from _train_world import WordFormatter, make_examples, tiny_model_config

DRIVER = Path(__file__).resolve().parent / "_train_driver.py"
LM_ONLY = [4, 5, 6, 7]  # the second rank's whole first batch under sequential sampling


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    from convret.train.arguments import parse_arguments
    from convret.train.main import run
    from convret.train.model import build_model

    tok = word_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    tiny_model_config(tmp_path / "model.json", len(tok) + 8)
    common = ["--model_config", str(tmp_path / "model.json"), "--tokenizer_name_or_path", str(tmp_path / "tok"),
              "--max_session_len", "48", "--max_passage_len", "16", "--max_response_len", "16",
              "--num_negatives", "2", "--max_steps", "3", "--save_steps", "100", "--learning_rate", "2e-3",
              "--warmup_steps", "0", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
              "--temperature", "0.05", "--learnable_temperature", "true", "--train_sampling_strategy", "sequential",
              "--seed", "5", "--dataloader_num_workers", "0"]

    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(DRIVER), str(tmp_path), "--examples", "24", "--lm-only",
           ",".join(map(str, LM_ONLY)), "--", *common, "--output_dir", str(two), "--per_device_train_batch_size",
           "4", "--ddp_backend", "gloo"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]

    one = tmp_path / "one"
    m, d, l, t = parse_arguments([*common[4:], "--model_config", str(tmp_path / "model.json"),
                                  "--tokenizer_name_or_path", str(tmp_path / "tok"), "--output_dir", str(one),
                                  "--per_device_train_batch_size", "8"])
    built = build_model(m, d, l)
    examples = make_examples(24, negatives=2, lm_only=LM_ONLY)
    assert run(m, d, l, t, examples=examples, formatter=WordFormatter(built.tokenizer), built=built) == 0

    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    init = load_file(one / "init" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved > 1e-3, "training did not move the weights: the comparison could not fail"
    # the key bias's gradient is zero in exact arithmetic (a constant added to every key shifts all scores of a
    # query equally), so it is pure round-off that Adam normalises: compared only within the global norm
    errors = {k: float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a}
    worst = max((e, k) for k, e in errors.items() if "k_proj.bias" not in k)
    assert worst[0] <= 1e-4, f"{worst[1]}: relative difference {worst[0]:.2e}"
    flat_a = torch.cat([a[k].reshape(-1) for k in a])
    flat_b = torch.cat([b[k].reshape(-1) for k in a])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) <= 1e-4
    import json

    tau = [json.loads((p / "final" / "convret_config.json").read_text())["temperature"] for p in (one, two)]
    assert abs(tau[0] - tau[1]) <= 1e-4 * tau[0] and abs(tau[0] - 0.05) > 1e-6  # learnable tau moved, equally
