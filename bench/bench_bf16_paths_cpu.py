"""bf16 session attention on CPU, side by side in one process: convret with each 16-bit tile GEMM / path forced
(mkl, onednn, upcast, packed; --tiles adds packed runs with other tile sizes), the peers (SDPA decomposition,
compiled FlexAttention, forward only on CPU), and the in-run bf16 GEMM ceiling (best 2048^3 matmul, before and
after). Rounds alternate between all methods; medians. docs/cpu_backend.md, "bf16 packed path (issue 22)".

    python bench/bench_bf16_paths_cpu.py --bwd                      # 2 threads, wall time, B 2 Hq 16 Hkv 4
    python bench/bench_bf16_paths_cpu.py --bwd --cpu-time --reps 3  # 1 thread, process CPU time
"""
import argparse, os, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from convret.ops.session_attention import cpu as _cpu_backend
from convret.ops.session_attention.cpu import session_attention_cpu, TileSizes, default_tile_sizes
from bench.attention import csit_layout, make_inputs
from bench.peers import build_peers, attention_flops, SDPA_DECOMP, FLEX
from bench import harness as H
ap = argparse.ArgumentParser()
ap.add_argument("--variants", default="mkl,onednn,upcast,packed")
ap.add_argument("--tiles", default="", help="extra packed runs, e.g. 32x128:32x64;64x128:32x64 (fwd_m x fwd_n : bwd_m x bwd_n)")
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--bwd", action="store_true", help="time forward + backward too")
ap.add_argument("--peers", default="sdpa,flex")
ap.add_argument("--session", type=int, default=1024)
ap.add_argument("--cpu-time", action="store_true", help="1 thread, process CPU time (robust to other tenants)")
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--hq", type=int, default=16)
ap.add_argument("--hkv", type=int, default=4)
ap.add_argument("--response", type=int, default=384)
a = ap.parse_args()
clock = time.perf_counter
if a.cpu_time:
    torch.set_num_threads(1); clock = time.process_time
ns = argparse.Namespace(q_heads=a.hq, kv_heads=a.hkv, head_dim=128)
layout = csit_layout(a.batch, a.session, a.response, 3)
q, k, v = make_inputs(layout, ns, torch.bfloat16, "cpu")
grad = torch.randn(q.shape, dtype=torch.bfloat16)
scale = 128 ** -0.5
ff, fb = attention_flops(layout, a.hq, 128, False), attention_flops(layout, a.hq, 128, True)
print("uptime:", os.popen("uptime").read().strip(), "| clock", clock.__name__, "| threads", torch.get_num_threads(), "| L", layout.seq_len, f"| useful GFLOP fwd {ff/1e9:.2f} fwd+bwd {fb/1e9:.2f}")
print("probe:", _cpu_backend.tile_gemm_info()["bf16"])
variants = {}
for name in a.variants.split(","):
    variants[name] = (name, None)
for spec in filter(None, a.tiles.split(";")):
    f, b = spec.split(":")
    fm, fn = map(int, f.split("x")); bm, bn = map(int, b.split("x"))
    variants[f"packed {spec}"] = ("packed", TileSizes(fm, fn, bm, bn))
peers = {}
names = {"sdpa": SDPA_DECOMP, "flex": FLEX}
for p in filter(None, a.peers.split(",")):
    peers[names[p]] = build_peers(layout, torch.bfloat16, torch.device("cpu"), [names[p]], scale)[names[p]]
def conv(impl, tiles):
    def setup():
        _cpu_backend.set_tile_gemm(torch.bfloat16, impl)
    def fwd():
        with torch.no_grad():
            session_attention_cpu(q, k, v, layout, scale, implementation="native", tile_sizes=tiles)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    def fb():
        session_attention_cpu(qg, kg, vg, layout, scale, implementation="native", tile_sizes=tiles).backward(grad)
        qg.grad = kg.grad = vg.grad = None
    return setup, fwd, fb
fns = {n: conv(*spec) for n, spec in variants.items()}
for n, p in peers.items():
    def fwd(p=p):
        with torch.no_grad():
            p.fn(q, k, v)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    def fbp(p=p, qg=qg, kg=kg, vg=vg):
        p.fn(qg, kg, vg).backward(grad); qg.grad = kg.grad = vg.grad = None
    fns[n] = (lambda: None, fwd, fbp if p.has_backward else None)
t = time.time()
for n, (setup, fwd, fbw) in fns.items():  # first calls: compile flex, JIT ukernels
    setup(); fwd()
    if a.bwd and fbw: fbw()
print(f"first calls {time.time()-t:.1f}s")
def ceiling():
    x = torch.randn(2048, 2048, dtype=torch.bfloat16); y = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(2): x @ y
    best = 1e9
    for _ in range(5):
        t0 = clock(); x @ y; best = min(best, clock() - t0)
    return 2 * 2048**3 / best / 1e9
ceil = [ceiling()]
times = {n: {"fwd": [], "fwd_bwd": []} for n in fns}
for r in range(a.reps + 1):
    for n, (setup, fwd, fbw) in fns.items():
        setup()
        t0 = clock(); fwd(); dt = clock() - t0
        if r: times[n]["fwd"].append(dt)
        if a.bwd and fbw:
            t0 = clock(); fbw(); dt = clock() - t0
            if r: times[n]["fwd_bwd"].append(dt)
ceil.append(ceiling())
c = max(ceil)
print(f"bf16 GEMM ceiling 2048^3 (best, before/after): {ceil[0]:.0f} / {ceil[1]:.0f} GFLOP/s")
best_peer = {}
for n, tt in times.items():
    row = [n]
    for lab, fl in (("fwd", ff), ("fwd_bwd", fb)):
        if tt[lab]:
            ms = statistics.median(tt[lab]) * 1e3
            row.append(f"{lab} {ms:.1f} ms ({fl/ms/1e6:.0f} GFLOP/s, {100*fl/ms/1e6/c:.0f}%)")
            if n in peers: best_peer[lab] = min(best_peer.get(lab, 1e9), ms)
    print(" | ".join(row))
for n, tt in times.items():
    if n in peers: continue
    sp = [f"{lab} {best_peer[lab]/(statistics.median(tt[lab])*1e3):.2f}x" for lab in ("fwd", "fwd_bwd") if tt[lab] and lab in best_peer]
    print("speed-up over best peer", n, " ".join(sp))
print("uptime:", os.popen("uptime").read().strip())
_cpu_backend.set_tile_gemm(torch.bfloat16, "auto")
