"""``convret bench gpu-check``: proof on this GPU that every Triton kernel is right, then a short timing sweep.

On a CUDA machine (meant to finish in under 5 minutes):

1. session attention, forward + backward (out, dq, dk, dv), at the default tiles, head dims 64 and 128, GQA,
   a packed CSIT layout with padding, against the float64 dense-mask oracle, in fp16, bf16 and fp32;
2. InfoNCE (loss, d queries, d passages) against float64 ``F.cross_entropy`` on the full logits;
3. linear cross-entropy with label smoothing (loss, d hidden, d weight) against float64 full-logit
   ``F.cross_entropy``;
4. the Hugging Face parity: a tiny Qwen2 with ``attn_implementation="convret"`` and a SessionLayout against
   eager attention with the equivalent additive 4-D mask (hidden states and LoRA gradients);
5. the one-pass CSIT step on CUDA against the four-forward reference (loss and LoRA gradients);
6. a short timing sweep of session attention against its peers (``convret bench attention`` at small sizes).

Tolerances: |got - want| <= tol * max |want| with tol 2e-2 for bf16, 5e-3 for fp16 and 5e-3 for fp32 (fp32
``tl.dot`` runs TF32 products on the GPU); the HF and CSIT checks use fp32 models (TF32 off): 1e-3.

Writes ``gpu-check.json`` and ``gpu-check.md``. Exit codes: 0 every check ran and passed; 1 a mismatch;
4 nothing failed but the CUDA checks could not run (no CUDA device). Without CUDA, ``--interpret`` runs the
Triton checks on CPU tensors under ``TRITON_INTERPRET=1`` (set before the kernels are imported; fp32 and
fp16 only, the interpreter cannot do bf16 ``tl.dot``) at tiny sizes: a test of the checks, not of a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import harness as H

NAME = "gpu-check"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TOLERANCE = {"fp16": 5e-3, "bf16": 2e-2, "fp32": 5e-3}
INTERPRETER_TOLERANCE = {"fp16": 5e-3, "fp32": 2e-4}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- checks
def check_session_attention(device, dtype_name: str, head_dim: int, small: bool) -> dict:
    from convret import SessionLayout
    from convret.ops.session_attention import reference_attention
    from convret.kernels.session_attention import default_configs, session_attention_triton

    dtype = DTYPES[dtype_name]
    t = 3
    if small:
        segments = [[(40, t, 20 + t), (24, t, 0)], [(56, t, 12 + t)]]
        seq_len, q_heads, kv_heads = 112, 4, 2
    else:
        segments = [[(700, t, 300 + t), (384, t, 0), (384, t, 0)], [(1500, t, 200 + t)]]
        seq_len, q_heads, kv_heads = 1800, 8, 2
    layout = SessionLayout.from_segments(segments, seq_len, device=device)
    gen = torch.Generator().manual_seed(head_dim)

    def draw(heads):
        return torch.randn(2, heads, seq_len, head_dim, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = draw(q_heads), draw(kv_heads), draw(kv_heads)
    grad = torch.randn(q.shape, generator=gen).to(device, dtype)
    scale = head_dim**-0.5
    out = session_attention_triton(q, k, v, layout, scale)
    out.backward(grad)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    want = reference_attention(q64, k64, v64, layout.to("cpu"), scale)
    want.backward(grad.cpu().double())
    errors = {"out": _rel(out, want), "dq": _rel(q.grad, q64.grad), "dk": _rel(k.grad, k64.grad),
              "dv": _rel(v.grad, v64.grad)}
    return {"errors": errors, "configs": {k_: list(v_) for k_, v_ in default_configs(head_dim, dtype).items()}}


def check_info_nce(device, dtype_name: str, small: bool) -> dict:
    import convret

    dtype = DTYPES[dtype_name]
    num_q, group, dim = (16, 3, 32) if small else (512, 5, 256)
    gen = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(num_q, dim, generator=gen), dim=-1).to(device, dtype).requires_grad_()
    p = F.normalize(torch.randn(num_q * group, dim, generator=gen), dim=-1).to(device, dtype).requires_grad_()
    loss = convret.info_nce(q, p, 0.05, group_size=group, backend="triton")
    loss.backward()
    q64, p64 = (x.detach().cpu().double().requires_grad_() for x in (q, p))
    want = F.cross_entropy(q64 @ p64.T / 0.05, torch.arange(num_q) * group)
    want.backward()
    return {"errors": {"loss": _rel(loss, want), "dq": _rel(q.grad, q64.grad), "dp": _rel(p.grad, p64.grad)}}


def check_linear_cross_entropy(device, dtype_name: str, small: bool) -> dict:
    import convret

    dtype = DTYPES[dtype_name]
    tokens, hidden, vocab = (24, 32, 300) if small else (1024, 512, 32000)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::5] = -100
    loss = convret.linear_cross_entropy(h, w, labels.to(device), label_smoothing=0.1, backend="triton")
    loss.backward()
    h64, w64 = (x.detach().cpu().double().requires_grad_() for x in (h, w))
    want = F.cross_entropy(h64 @ w64.T, labels, label_smoothing=0.1)
    want.backward()
    return {"errors": {"loss": _rel(loss, want), "dh": _rel(h.grad, h64.grad), "dw": _rel(w.grad, w64.grad)}}


def check_hf_parity(device) -> dict:
    import peft
    import transformers

    import convret.hf  # noqa: F401
    from convret import SessionLayout
    from convret.baselines import additive_mask
    from convret.csit import decoder_of

    config = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                      max_position_embeddings=2048, attention_dropout=0.0)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.to(device).train()
    layout = SessionLayout.from_segments([[(300, 3, 100 + 3), (64, 3, 0)], [(400, 3, 50 + 3)]], 512, device=device)
    ids = torch.randint(1, 1000, (2, 512), device=device)
    results = {}
    for impl in ("eager", "convret"):
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(impl)
        kwargs = ({"session_layout": layout} if impl == "convret"
                  else {"attention_mask": additive_mask(layout, torch.float32)})
        hidden = decoder_of(model)(input_ids=ids, position_ids=layout.position_ids(), use_cache=False, **kwargs).last_hidden_state
        real = (layout.dense_mask().any(-1))  # padding rows differ by convention: compare real tokens only
        (hidden[real] ** 2).mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[impl] = (hidden[real].detach(), grads)
    return {"errors": {"hidden": _rel(results["convret"][0], results["eager"][0]),
                       "lora_grads": _rel(results["convret"][1], results["eager"][1])}}


def check_csit_step(device) -> dict:
    from .step import ABLATION, build_model, lora_grads, make_examples, step

    shape = {"sessions": 2, "session": 200, "passage": 64, "response": 64, "negatives": 2, "summary": 3,
             "hidden": 128, "intermediate": 256, "layers": 2, "heads": 2, "kv_heads": 1, "vocab": 2000, "max_len": 512}
    model = build_model(shape).to(device)
    examples = make_examples(shape)
    with torch.device(device):
        out = {}
        for config in (ABLATION[0], ABLATION[4]):  # the reference and convret's one-pass step
            model.zero_grad(set_to_none=True)
            loss = step(model, examples, shape, config)
            out[config.name] = (torch.tensor(loss), lora_grads(model).detach().clone())
    ref, ours = out[ABLATION[0].name], out[ABLATION[4].name]
    return {"errors": {"loss": _rel(ours[0], ref[0]), "lora_grads": _rel(ours[1], ref[1])}}


# ------------------------------------------------------------------------------------------------ driver
def plan(cuda: bool, interpret: bool, head_dims: list[int]) -> list[tuple[str, Callable[[], dict], float | None, str | None]]:
    """(name, check, tolerance, why-not-run) for every item."""
    device = torch.device("cuda" if cuda else "cpu")
    small = not cuda
    items = []
    triton_ok = cuda or interpret
    for dtype_name in DTYPES:
        reason = None
        if not triton_ok:
            reason = "not run: no CUDA device"
        elif not cuda and dtype_name == "bf16":
            reason = "not run: no CUDA device (the Triton interpreter cannot do bf16 tl.dot)"
        tol = TOLERANCE[dtype_name] if cuda else INTERPRETER_TOLERANCE.get(dtype_name)
        for head_dim in head_dims:
            items.append((f"session attention fwd+bwd, D={head_dim}, {dtype_name}",
                          lambda d=dtype_name, hd=head_dim: check_session_attention(device, d, hd, small), tol, reason))
        items.append((f"InfoNCE fwd+bwd, {dtype_name}", lambda d=dtype_name: check_info_nce(device, d, small), tol, reason))
        items.append((f"linear cross-entropy fwd+bwd, {dtype_name}",
                      lambda d=dtype_name: check_linear_cross_entropy(device, d, small), tol, reason))
    # without CUDA, --interpret runs these two on CPU (convret's CPU backend): labelled so, never a CUDA result
    no_cuda = None if cuda or interpret else "not run: no CUDA device"
    where = "on CUDA" if cuda else "on CPU (no CUDA device: not a GPU result)"
    items.append((f"Hugging Face parity (Qwen2 + LoRA, convret vs eager + 4-D mask) {where}",
                  lambda: check_hf_parity(device), 1e-3, no_cuda))
    items.append((f"one-pass CSIT step vs the four-forward reference {where}", lambda: check_csit_step(device), 1e-3,
                  no_cuda))
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interpret", action="store_true",
                        help="without CUDA: run the Triton checks on CPU under TRITON_INTERPRET=1 (tiny sizes)")
    parser.add_argument("--head-dims", default="64,128", help="session-attention head dims (64,128)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing sweep")


def run(args, argv: list[str]) -> int:
    from .cli import EXIT_MISMATCH, EXIT_NO_CUDA, EXIT_OK

    cuda = torch.cuda.is_available() and args.device != "cpu"
    interpret = not cuda and args.interpret
    if interpret:
        if "convret.kernels.session_attention" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("convret bench gpu-check: --interpret needs TRITON_INTERPRET=1 before the kernels are imported; "
                  "run it as a fresh command", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    head_dims = [int(x) for x in args.head_dims.split(",")]
    if interpret or args.smoke:
        head_dims = head_dims[:1] if args.smoke else head_dims
    device = torch.device("cuda" if cuda else "cpu")
    env = H.environment(device)
    started = time.perf_counter()
    items = []
    for name, fn, tol, reason in H.progress(plan(cuda, interpret, head_dims), "gpu-check"):
        item: dict[str, Any] = {"check": name, "tolerance": tol}
        if reason:
            item.update(status="not run", reason=reason)
        else:
            try:
                item.update(fn())
                worst = max(item["errors"].values())
                item.update(status="pass" if worst <= tol else "FAIL", max_relative_error=worst)
            except Exception as error:  # noqa: BLE001 - a crash is a failed check, reported with its traceback
                item.update(status="FAIL", error=f"{type(error).__name__}: {error}",
                            traceback=traceback.format_exc()[-3000:])
        items.append(item)
    timing = None
    if cuda and not args.no_timing:
        from .attention import add_arguments as attention_arguments, run as attention_run
        from .cli import common_arguments

        parser = argparse.ArgumentParser()
        attention_arguments(parser)
        common_arguments(parser)
        timing_argv = ["--sessions", "512,1024,2048,4096", "--responses", "", "--reps", "10", "--warmup", "3",
                       "--out", os.path.join(args.out, "gpu-check-timing")]
        code = attention_run(parser.parse_args(timing_argv), ["attention", *timing_argv])
        timing = {"exit_code": code, "results": os.path.join(args.out, "gpu-check-timing", "attention.json")}
    else:
        timing = {"status": "not run", "reason": "--no-timing" if cuda else "not run: no CUDA device"}
    failed = [i for i in items if i["status"] == "FAIL"]
    not_run = [i for i in items if i["status"] == "not run"]
    if failed:
        code, verdict = EXIT_MISMATCH, f"FAILED: {len(failed)} check(s) do not match their oracle"
    elif not_run or not cuda:  # never a pass without a GPU, even when every item that could run passed
        code, verdict = EXIT_NO_CUDA, (f"INCOMPLETE: no CUDA device; {len(not_run)} of {len(items)} checks not run"
                                       + (", the Triton checks ran under the CPU interpreter (not a GPU result)"
                                          if interpret else ""))
    else:
        code, verdict = EXIT_OK, f"PASSED: all {len(items)} checks on {env['gpu']['name']}"
    payload = {"benchmark": NAME, "command": H.command_line("convret bench", argv), "environment": env,
               "interpreter": interpret, "checks": items, "timing": timing, "verdict": verdict, "exit_code": code,
               "seconds": time.perf_counter() - started, "plots": []}
    if timing.get("results") and os.path.exists(timing["results"]):
        import glob

        payload["plots"] = sorted(glob.glob(os.path.join(args.out, "gpu-check-timing", "*.png")))
    H.finish(args.out, NAME, payload, format_report(payload))
    return code


def format_report(payload: dict) -> str:
    env = payload["environment"]
    where = env["gpu"]["name"] if env.get("gpu") else "no CUDA device" + (
        " (Triton interpreter on CPU)" if payload["interpreter"] else "")
    lines = [f"Command: `{payload['command']}`", "", f"Device: {where}; {H.environment_line(env)}", "",
             f"**{payload['verdict']}** (exit code {payload['exit_code']}, {payload['seconds']:.0f} s)", ""]
    rows = []
    for item in payload["checks"]:
        detail = item.get("reason") or item.get("error") or ", ".join(
            f"{k} {v:.1e}" for k, v in item.get("errors", {}).items())
        rows.append([item["check"], item["status"], "" if item["tolerance"] is None else f"{item['tolerance']:.0e}",
                     detail])
    lines.append(H.markdown_table(["check", "result", "tolerance (relative to max |oracle|)", "max relative errors"],
                                  rows))
    timing = payload["timing"]
    lines += ["", "Timing sweep: " + (f"`{timing['results']}` (exit code {timing['exit_code']})" if "results" in timing
                                     else timing["reason"])]
    return "\n".join(lines)
