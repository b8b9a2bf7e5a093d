"""Encoding benchmark: convret's packed, decoder-only encoder against the plain Hugging Face way.

1. Peak memory of encoding ONE session of 4k / 8k / 16k / 32k tokens, a fresh process per measurement (peak
   RSS reset with /proc/self/clear_refs just before the forward, so only the forward's own memory counts):
   convret (packed SessionLayout row, decoder only, attn "convret") vs plain HF (``*ForCausalLM`` with SDPA,
   an attention mask as a tokenizer returns it, ``output_hidden_states=True``, the LM head computed), alone
   and in a padded batch of two (the second one token shorter, so transformers builds a 4-D mask).
2. Passages/s on a realistic length mix (log-normal, median ~90 tokens, clipped to [16, 384]), side by side in
   one process, medians after a warm-up: convret (sorted, packed by a token budget) vs HF (padded batches of
   32 in file order, SDPA, output_hidden_states, last non-padding token). The embeddings are checked equal.

Usage::

    python bench/bench_encode.py                    # both parts
    python bench/bench_encode.py --lengths 4096 8192 --hf-max 16384 --passages 1000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

VOCAB = 512
MAX_POS = 40_000


def tiny_model(attn: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    import convret.hf  # noqa: F401

    config_path = None
    try:
        from convret.data.sample_world import TINY_MODEL_CONFIG

        config_path = TINY_MODEL_CONFIG
    except ImportError:
        pass
    if config_path is not None and os.path.exists(config_path):
        config = Qwen2Config.from_json_file(config_path)
    else:  # the tests' tiny Qwen2
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config.max_position_embeddings = MAX_POS
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_peak(method: str, length: int) -> dict:
    torch.set_num_threads(2)
    model = tiny_model("convret" if method == "convret" else "sdpa")
    ids = torch.randint(10, model.config.vocab_size, (1, length))
    from convret.retrieval.encoder import embed_sequences

    with torch.no_grad():  # warm-up on a short input (kernels, allocator)
        if method == "convret":
            embed_sequences(model, [ids[0, :64].tolist()], token_budget=length)
        else:
            model(input_ids=ids[:, :64], attention_mask=torch.ones(1, 64, dtype=torch.long), output_hidden_states=True)
    seq = ids[0].tolist()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak RSS
    base = _rss_kib("VmRSS:")
    start = time.perf_counter()
    with torch.no_grad():
        if method == "convret":
            embed_sequences(model, [seq], token_budget=length)
        elif method == "hf":
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            out.hidden_states[-1][0, -1].clone()
            del out
        else:  # hf_padded: the session in a padded batch beside one a token shorter (a 4-D mask is built)
            batch = ids.expand(2, -1).contiguous()
            mask = torch.ones_like(batch)
            mask[1, -1] = 0
            out = model(input_ids=batch, attention_mask=mask, output_hidden_states=True)
            out.hidden_states[-1][0, -1].clone()
            del out
    elapsed = time.perf_counter() - start
    return {"method": method, "tokens": length, "peak_mib": (_rss_kib("VmHWM:") - base) / 1024, "seconds": elapsed}


def run_child(method: str, length: int) -> dict | str:
    cmd = [sys.executable, __file__, "--child", method, str(length)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return f"failed (rc {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_encode(model, sequences, batch_size=32):
    out = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            last = mask.sum(1) - 1
            out.append(torch.nn.functional.normalize(hidden[torch.arange(len(batch)), last].float(), dim=-1))
    return torch.cat(out)


def throughput(n: int, repeats: int, budget: int) -> dict:
    import random

    from convret.retrieval.encoder import embed_sequences

    torch.set_num_threads(2)
    rng = random.Random(0)
    lengths = [min(384, max(16, int(rng.lognormvariate(4.5, 0.6)))) for _ in range(n)]
    sequences = [[rng.randrange(10, VOCAB) for _ in range(k)] for k in lengths]
    ours, hf = tiny_model("convret"), tiny_model("sdpa")
    hf.load_state_dict(ours.state_dict())
    warm = sequences[:64]
    embed_sequences(ours, warm, budget)
    hf_encode(hf, warm)
    times = {"convret": [], "hf": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = embed_sequences(ours, sequences, budget)
        times["convret"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = hf_encode(hf, sequences)
        times["hf"].append(time.perf_counter() - t0)
    max_diff = float((a - b).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"passages": n, "mean_len": sum(lengths) / n, "max_len": max(lengths), "token_budget": budget,
            "convret_pps": n / med["convret"], "hf_pps": n / med["hf"], "speedup": med["hf"] / med["convret"],
            "max_abs_diff": max_diff, "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    p.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    p.add_argument("--hf-max", type=int, default=16384, help="longest session the HF way is run at")
    p.add_argument("--passages", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--token-budget", type=int, default=16384)
    p.add_argument("--skip-peak", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_peak(args.child[0], int(args.child[1]))))
        return
    if not args.skip_peak:
        print("| session tokens | convret peak MiB | convret s | HF SDPA peak MiB | HF s | HF padded batch of 2 "
              "peak MiB | s |")
        print("|---|---|---|---|---|---|---|")
        for length in args.lengths:
            ours = run_child("convret", length)
            theirs = run_child("hf", length) if length <= args.hf_max else "not run"
            padded = run_child("hf_padded", length) if length <= args.hf_max else "not run"
            fmt = lambda r: (f"{r['peak_mib']:.0f} | {r['seconds']:.2f}" if isinstance(r, dict) else f"{r} | -")
            print(f"| {length} | {fmt(ours)} | {fmt(theirs)} | {fmt(padded)} |", flush=True)
    if not args.skip_throughput:
        r = throughput(args.passages, args.repeats, args.token_budget)
        print(f"\npassages/s, {r['passages']} passages (mean {r['mean_len']:.0f}, max {r['max_len']} tokens), "
              f"median of {r['repeats']}: convret {r['convret_pps']:.0f}, HF padded SDPA {r['hf_pps']:.0f} "
              f"(x{r['speedup']:.2f}); max |diff| of the embeddings {r['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
