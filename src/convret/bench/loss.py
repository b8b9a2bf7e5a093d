"""``convret bench loss``: the two losses of a CSIT step against the full-logit way, forward + backward.

- InfoNCE (tau = 0.01, L2-normalised, Tevatron groups of 1 positive + --group-size - 1 hard negatives, every
  other passage of the batch as in-batch negative): naive ``F.cross_entropy(q @ p.T / tau)`` against
  ``convret.info_nce`` (chunked on CPU, Triton on CUDA) and Inf-CL (``inf_cl``, CUDA) when installed,
  across query batch sizes up to where the naive [Q, P] logits no longer fit.
- LM loss (label smoothing 0.1, --vocab tokens, hidden --hidden): ``F.cross_entropy(hidden @ W.T)`` on the
  full logits against ``convret.linear_cross_entropy`` (chunked; Triton on CUDA) and Liger-Kernel /
  Cut Cross-Entropy when installed (both CUDA), across numbers of labelled tokens.

Time: methods side by side in one process, medians after warm-up. Peak memory: a fresh process per
(method, size), ``VmHWM`` above the inputs on CPU (``max_memory_allocated`` on CUDA). A method whose
estimated need exceeds the memory guard is reported as OOM at that size without running.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F

import convret

from . import harness as H

NAME = "loss"
TEMPERATURE, LABEL_SMOOTHING = 0.01, 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------- InfoNCE
def info_nce_inputs(num_queries: int, group_size: int, dim: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(num_queries, dim, generator=gen)
    passages = torch.randn(num_queries * group_size, dim, generator=gen)
    for t in (queries, passages):  # in place: no input-sized temporaries before a memory measurement
        t.div_(t.norm(dim=-1, keepdim=True))
    return queries.to(device, dtype).requires_grad_(), passages.to(device, dtype).requires_grad_()


def info_nce_methods(device: torch.device) -> dict[str, Callable | str]:
    """name -> step(queries, passages, group_size) -> loss (backward done), or the reason it cannot run."""

    def naive(q, p, group_size):
        labels = torch.arange(q.shape[0], device=q.device) * group_size
        loss = F.cross_entropy((q @ p.T).float() / TEMPERATURE, labels)
        loss.backward()
        return loss.detach()

    def ours(q, p, group_size):
        loss = convret.info_nce(q, p, TEMPERATURE, group_size=group_size)
        loss.backward()
        return loss.detach()

    methods: dict[str, Callable | str] = {"naive F.cross_entropy": naive, "convret.info_nce": ours}
    if importlib.util.find_spec("inf_cl") is None:
        methods["Inf-CL"] = "inf_cl not installed"
    elif device.type != "cuda":
        methods["Inf-CL"] = "no CUDA device (Inf-CL is CUDA only)"
    else:
        def inf_cl(q, p, group_size):  # Inf-CL takes one positive per query at labels = arange * group_size
            from inf_cl import cal_inf_loss

            labels = torch.arange(q.shape[0], device=q.device) * group_size
            loss = cal_inf_loss(q, p, labels=labels, scale=1 / TEMPERATURE).mean()
            loss.backward()
            return loss.detach()
        methods["Inf-CL"] = inf_cl
    return methods


def info_nce_need(method: str, num_queries: int, group_size: int, dim: int, dtype) -> int:
    if method.startswith("naive"):  # logits, their fp32 copy / softmax and the gradient of each
        return 3 * num_queries * num_queries * group_size * 4
    return 0


# ------------------------------------------------------------------------------------------------ LM
def lm_inputs(tokens: int, hidden: int, vocab: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=gen)).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::7] = -100  # some unlabelled positions, as in a batch
    return h, w, labels.to(device)


def lm_methods(device: torch.device) -> dict[str, Callable | str]:
    def naive(h, w, labels):
        loss = F.cross_entropy((h @ w.T).float(), labels, label_smoothing=LABEL_SMOOTHING)
        loss.backward()
        return loss.detach()

    def ours(h, w, labels):
        loss = convret.linear_cross_entropy(h, w, labels, label_smoothing=LABEL_SMOOTHING)
        loss.backward()
        return loss.detach()

    methods: dict[str, Callable | str] = {"full-logit F.cross_entropy": naive, "convret.linear_cross_entropy": ours}
    for name, module in (("Liger-Kernel", "liger_kernel"), ("Cut Cross-Entropy", "cut_cross_entropy")):
        if importlib.util.find_spec(module) is None:
            methods[name] = f"{module} not installed"
        elif device.type != "cuda":
            methods[name] = f"no CUDA device ({name} is CUDA only)"
    if not isinstance(methods.get("Liger-Kernel"), str):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, labels):
            loss = liger_fused_linear_cross_entropy(h, w, labels, label_smoothing=LABEL_SMOOTHING)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.backward()
            return loss.detach()
        methods["Liger-Kernel"] = liger
    if not isinstance(methods.get("Cut Cross-Entropy"), str):
        from cut_cross_entropy import linear_cross_entropy as cce

        def cut(h, w, labels):
            loss = cce(h, w, labels, ignore_index=-100)  # CCE has no label smoothing: timed without it
            loss.backward()
            return loss.detach()
        methods["Cut Cross-Entropy"] = cut
    return methods


def lm_need(method: str, tokens: int, hidden: int, vocab: int, dtype) -> int:
    if method.startswith("full-logit"):  # logits, fp32 log-softmax, its gradient
        return 3 * tokens * vocab * 4
    return 0


# ------------------------------------------------------------------------------------------- children
def peak_child(kind: str, method: str, size: int, args: dict, device: str) -> dict:
    """Fresh process: a tiny warm-up step, then one forward + backward of ``method`` at ``size``."""
    ns = argparse.Namespace(**args)
    device = torch.device(device)
    dtype = DTYPES[ns.dtype]
    make, methods = _kind(kind, ns, dtype, device)
    step = methods[method]
    step(*make(8))
    inputs = make(size)
    with H.PeakMemory(device) as peak:
        loss = step(*inputs)
    return {"status": H.OK, "peak_above_inputs_bytes": peak.above_start_bytes, "loss": float(loss)}


def _kind(kind: str, ns, dtype, device):
    if kind == "info_nce":
        def make(size):
            q, p = info_nce_inputs(size, ns.group_size, ns.dim, dtype, device)
            return q, p, ns.group_size
        return make, info_nce_methods(device)

    def make(size):
        return lm_inputs(size, ns.hidden, ns.vocab, dtype, device)
    return make, lm_methods(device)


def _need(kind: str, method: str, size: int, ns, dtype) -> int:
    if kind == "info_nce":
        return info_nce_need(method, size, ns.group_size, ns.dim, dtype)
    return lm_need(method, size, ns.hidden, ns.vocab, dtype)


def check(kind: str, ns, device) -> dict:
    """convret's loss and input gradients against the full-logit computation in float64 (small size)."""
    size = 64 if kind == "info_nce" else 96
    make, methods = _kind(kind, ns, torch.float32, device)
    ours_name = "convret.info_nce" if kind == "info_nce" else "convret.linear_cross_entropy"
    inputs = make(size)
    inputs64 = [t.detach().double().requires_grad_() if t.is_floating_point() else t
                for t in inputs[:2]] + list(inputs[2:])
    naive_name = next(iter(methods))
    want = methods[naive_name](*inputs64)
    got = methods[ours_name](*inputs)
    errors = {"loss": abs(float(got) - float(want)) / max(abs(float(want)), 1e-12)}
    for label, a, b in zip(("grad_0", "grad_1"), inputs[:2], inputs64[:2]):
        errors[label] = float((a.grad.double() - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-30))
    tolerance = 1e-3 if device.type == "cuda" else 1e-4  # TF32 products on CUDA
    return {"method": ours_name, "oracle": f"{naive_name} in float64", "relative_max_error": errors,
            "tolerance": tolerance, "passed": max(errors.values()) <= tolerance}


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", type=_ints, default=[1024, 2048, 4096, 8192, 16384],
                        help="InfoNCE query batch sizes Q (default 1024,...,16384; P = Q * group size)")
    parser.add_argument("--group-size", type=int, default=5, help="1 positive + hard negatives per query (5)")
    parser.add_argument("--dim", type=int, default=768, help="embedding dim (768)")
    parser.add_argument("--tokens", type=_ints, default=[1024, 2048, 4096, 8192],
                        help="LM loss: labelled tokens N (default 1024,2048,4096,8192)")
    parser.add_argument("--hidden", type=int, default=896, help="LM loss: hidden size (896, Qwen2-0.5B)")
    parser.add_argument("--vocab", type=int, default=151936, help="LM loss: vocabulary (151936, Qwen2)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="input dtype (fp32)")
    parser.add_argument("--only", choices=["info_nce", "lm"], default=None, help="run one of the two losses")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def apply_presets(args) -> None:
    if args.smoke:
        args.queries, args.dim, args.tokens, args.hidden, args.vocab = [64, 256], 64, [64, 256], 64, 2048
        args.reps, args.warmup = 2, 0
    elif args.quick:
        args.queries, args.dim, args.tokens, args.hidden, args.vocab = [512, 1024, 2048], 256, [256, 512, 1024], \
            256, 32000
        args.reps, args.warmup = 3, 1


def run(args, argv: list[str]) -> int:
    apply_presets(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    guard = H.memory_guard_bytes(args.max_memory_gib, device)
    payload: dict[str, Any] = {
        "benchmark": NAME, "command": H.command_line("convret bench", argv), "environment": H.environment(device),
        "shape": {"group_size": args.group_size, "dim": args.dim, "hidden": args.hidden, "vocab": args.vocab,
                  "dtype": args.dtype, "temperature": TEMPERATURE, "label_smoothing": LABEL_SMOOTHING},
        "memory_guard_bytes": guard, "reps": args.reps, "warmup": args.warmup,
        "gemm_ceiling": {args.dtype: H.gemm_ceiling(dtype, device, size=1024 if args.smoke else 2048)},
        "checks": {}, "results": {"info_nce": [], "lm": []},
    }
    kinds = [args.only] if args.only else ["info_nce", "lm"]
    child_args = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))}
    for kind in kinds:
        payload["checks"][kind] = check(kind, args, device)
        make, methods = _kind(kind, args, dtype, device)
        sizes = args.queries if kind == "info_nce" else args.tokens
        for size in H.progress(sizes, f"bench loss {kind}"):
            records: dict[str, dict] = {}
            runnable = {}
            for name, step in methods.items():
                if isinstance(step, str):
                    records[name] = {"status": H.SKIPPED, "reason": step}
                    continue
                need = _need(kind, name, size, args, dtype)
                if need > guard:
                    records[name] = H.oom_result(need, guard)
                    continue
                records[name] = {"status": H.OK}
                runnable[name] = step
            inputs = make(size) if runnable else None
            losses = {}

            def wrap(name, step):
                def call():
                    for t in inputs[:2]:
                        t.grad = None
                    losses[name] = float(step(*inputs))
                return call
            calls = {name: wrap(name, step) for name, step in runnable.items()}
            for name in list(calls):  # a first call surfaces an OOM before the timed rounds
                try:
                    calls[name]()
                except Exception as error:  # noqa: BLE001
                    if not H.is_oom(error):
                        raise
                    records[name] = {"status": H.OOM, "reason": f"{type(error).__name__}: {str(error)[:200]}"}
                    del calls[name]
            if calls:
                times = H.interleaved_ms(calls, reps=args.reps, warmup=args.warmup, device=device)
                for name, runs in times.items():
                    records[name].update({"ms": sorted(runs)[len(runs) // 2], "runs_ms": runs, "loss": losses[name]})
            del inputs
            if not args.no_memory:
                for name, rec in records.items():
                    if rec["status"] != H.OK:
                        continue
                    if device.type == "cuda":
                        inputs = make(size)
                        torch.cuda.empty_cache()
                        with H.PeakMemory(device) as peak:
                            methods[name](*inputs)
                        rec["peak_above_inputs_bytes"] = peak.above_start_bytes
                        del inputs
                        continue
                    child = H.run_isolated("convret.bench.loss:peak_child",
                                           {"kind": kind, "method": name, "size": size, "args": child_args,
                                            "device": "cpu"})
                    if child["status"] == H.OK:
                        rec["peak_above_inputs_bytes"] = child["peak_above_inputs_bytes"]
                    else:
                        rec["peak_status"] = child["status"]
                        rec["peak_detail"] = child.get("reason") or child.get("error")
            payload["results"][kind].append({"size": size, "methods": records})
    payload["passed"] = all(c["passed"] for c in payload["checks"].values())
    payload["plots"] = [str(p) for p in make_plots(payload, args.out)]
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def format_report(payload: dict) -> str:
    shape = payload["shape"]
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"]), "",
             f"{shape['dtype']}, forward + backward; medians of {payload['reps']} side-by-side rounds; peak memory "
             "above the inputs, fresh process per cell."]
    for kind, check in payload["checks"].items():
        lines.append(f"\nCheck: {check['method']} vs {check['oracle']}: "
                     f"{'pass' if check['passed'] else 'FAIL'} (max relative error "
                     f"{max(check['relative_max_error'].values()):.1e}, tolerance {check['tolerance']:.0e})")
    titles = {"info_nce": f"**InfoNCE**, P = Q x {shape['group_size']}, D = {shape['dim']}, tau = {shape['temperature']}",
              "lm": f"**LM loss**, H = {shape['hidden']}, V = {shape['vocab']}, label smoothing {shape['label_smoothing']}"}
    for kind, results in payload["results"].items():
        if not results:
            continue
        names = list(results[0]["methods"])
        baseline = names[0]
        lines += ["", titles[kind], ""]
        rows = []
        for result in results:
            for name in names:
                rec = result["methods"][name]
                base = result["methods"][baseline]
                speed = (f"{base['ms'] / rec['ms']:.2f}x" if rec.get("ms") and base.get("ms") and name != baseline
                         else "")
                mem = ("OOM" if rec.get("peak_status") == H.OOM
                       else H.cell(rec, "peak_above_inputs_bytes", H.fmt_mib))
                saving = (f"{base['peak_above_inputs_bytes'] / max(rec['peak_above_inputs_bytes'], 1):.1f}x"
                          if rec.get("peak_above_inputs_bytes") and base.get("peak_above_inputs_bytes")
                          and name != baseline else "")
                rows.append([result["size"], name, H.cell(rec, "ms", H.fmt_ms), speed, mem, saving])
        lines.append(H.markdown_table(["Q" if kind == "info_nce" else "tokens", "method", "fwd+bwd",
                                       f"speed-up vs {baseline}", "peak memory", "memory saving"], rows))
        skipped = sorted({f"{n}: {r['methods'][n]['reason']}" for r in results for n in names
                          if r["methods"][n]["status"] == H.SKIPPED})
        if skipped:
            lines.append("\nNot run: " + "; ".join(skipped))
    lines += ["", f"OOM = ran out of memory or its estimated need exceeds the memory guard "
              f"({payload['memory_guard_bytes'] / 2**30:.1f} GiB)."]
    return "\n".join(lines)


def make_plots(payload: dict, out_dir) -> list:
    plots = []
    for kind, results in payload["results"].items():
        if not results:
            continue
        xlabel = "queries Q" if kind == "info_nce" else "labelled tokens"
        for key, ylabel, scale in (("ms", "median fwd+bwd time (ms)", 1), ("peak_above_inputs_bytes",
                                                                          "peak memory above inputs (MiB)", 2**20)):
            series: dict[str, list] = {}
            for result in results:
                for name, rec in result["methods"].items():
                    if rec["status"] == H.SKIPPED:
                        continue
                    value = rec.get(key)
                    series.setdefault(name, []).append((result["size"], None if value is None else value / scale))
            if series:
                plots.append(H.plot_lines(f"{out_dir}/loss_{kind}_{'time' if key == 'ms' else 'memory'}.png",
                                          series, xlabel, ylabel, f"{kind} loss, {payload['environment']['device']}"))
    return plots
