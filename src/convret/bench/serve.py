"""``convret bench serve``: the incremental session encoder and the HTTP service.

1. Per-turn latency: one conversation grows turn by turn (user and assistant turns of about ``--turn-words``
   words drawn from the sample world) until it passes each of ``--lengths`` tokens (default 1k, 2k, 4k, 8k).
   At every turn the incremental encoder (:class:`convret.retrieval.session_encoder.SessionEncoder`: the new
   turns and the summary tokens on top of the cached keys / values) encodes the session; past each target
   length, for ``--reps`` turns, a full re-encode of the same session (what every other conversational
   retriever does per turn: no cache) is timed beside it in the same process and the two embeddings are
   compared (fp32, max |diff| <= 1e-5, else exit code 1).
2. Encoder batching (in process, no HTTP): the request mix of the service measurement (each of C clients' i-th
   request is one round) through two :class:`SessionEncoder` s side by side: one ``encode_requests`` per
   request against one per round (the dynamic batcher's best case). Per-request forward time, the ratio (what
   batching saves in the model itself; the service also saves per batch on its search and thread hand-offs) and
   the two ways' max |diff|.
3. Service: ``convret serve`` in a subprocess (the same model, an index of ``--passages`` sample-world
   passages), with batching on and off (``--no-batching``); ``--concurrency`` clients (default 1, 8, 32) in one
   asyncio process (aiohttp: a light load generator, so that the server gets the cores), each asking
   ``--requests-per-client`` searches of its own growing conversations; requests per second, p50 / p99
   latency, and the server's and the clients' CPU time per request.
4. Memory (``--rss-passages``, default 100 k and 1 M): ``convret serve`` over a synthetic collection of that
   many 500-character passages (sample-world text, unique ids; random vectors in a ``PQ16`` index, 16 bytes per
   passage, so that the index is not what is measured): the server's RSS (``VmRSS``) after 200 searches and its
   peak (``VmHWM``), at its first start (building the passage store) and at a second (reusing it); beside it the
   RSS that a dict of the collection's texts, what the service held before the passage store, adds to a process.
   RSS figures do not depend on the machine's load.

The model is a tiny Qwen2 built from a config (``--hidden``, ``--layers``; the sample world's tokenizer; no
weights downloaded), fp32.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import harness as H

NAME = "serve"
TOLERANCE = 1e-5


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="session lengths (tokens) to report")
    parser.add_argument("--turn-words", type=int, default=30, help="words per user / assistant turn")
    parser.add_argument("--hidden", type=int, default=128, help="model hidden size")
    parser.add_argument("--layers", type=int, default=2, help="model layers")
    parser.add_argument("--concurrency", default="1,8,32", help="client counts of the service measurement")
    parser.add_argument("--requests-per-client", type=int, default=16, help="searches per client")
    parser.add_argument("--passages", type=int, default=500, help="passages in the index")
    parser.add_argument("--server-threads", type=int, default=None, help="torch threads of the server")
    parser.add_argument("--no-service", action="store_true", help="only the per-turn latency and the encoder "
                                                                    "batching (no HTTP service)")
    parser.add_argument("--rss-passages", default="100000,1000000",
                        help="collection sizes of the memory measurement ('' to skip it)")


def sample_words() -> list[str]:
    from convret.data.sample_world import COLLECTION, SAMPLE_WORLD_DIR

    words: list[str] = []
    with open(Path(SAMPLE_WORLD_DIR) / COLLECTION, encoding="utf-8") as handle:
        for line in handle:
            words += json.loads(line)["text"].split()
            if len(words) > 20000:
                break
    return words


def build_checkpoint(directory: Path, hidden: int, layers: int, max_len: int) -> Path:
    import transformers

    import convret.hf  # noqa: F401
    from convret.data.sample_world import TOKENIZER_DIR
    from convret.data.summary_tokens import add_summary_tokens
    from convret.train.checkpoint import RetrieverConfig, save_retriever

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer) + 8, hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=max(1, hidden // 32), num_key_value_heads=2,
                                      max_position_embeddings=max_len + 1024, tie_word_embeddings=False,
                                      use_sliding_window=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="convret")
    summary = add_summary_tokens(model, tokenizer, 3)
    cfg = RetrieverConfig(summary.tokens, summary.ids, max_session_len=None, max_passage_len=128)
    return save_retriever(directory, model.eval(), tokenizer, cfg)


def turn_text(rng: random.Random, words: list[str], n: int) -> str:
    start = rng.randrange(0, len(words) - n)
    return " ".join(words[start : start + n])


# ------------------------------------------------------------------------------------ 1. per-turn latency
def per_turn(checkpoint: Path, lengths: list[int], turn_words: int, reps: int) -> list[dict]:
    from convret.data.records import Turn
    from convret.retrieval.encoder import Encoder
    from convret.retrieval.session_encoder import SessionEncoder

    encoder = Encoder.from_checkpoint(checkpoint)
    se = SessionEncoder(encoder, cache_mb=4096)
    words, rng = sample_words(), random.Random(0)
    turns: list[Turn] = []
    rows = []
    pending = sorted(lengths)
    current: dict | None = None
    for _ in H.progress(itertools.count(), "bench serve (per turn, turns)"):
        turns.append(Turn("user", turn_text(rng, words, turn_words)))
        started = time.perf_counter()  # both ways are timed from the turns (tokenising included)
        vectors, infos = se.encode_requests([se.session_request("bench", turns)])
        incremental_ms = (time.perf_counter() - started) * 1e3
        total = infos[0].total_tokens
        if current is None and pending and total >= pending[0]:
            current = {"target": pending.pop(0), "tokens": [], "incremental_ms": [], "full_ms": [],
                       "computed_tokens": [], "max_abs_diff": 0.0}
        if current is not None:
            started = time.perf_counter()
            full = se.full_encode(turns)
            current["full_ms"].append((time.perf_counter() - started) * 1e3)
            current["incremental_ms"].append(incremental_ms)
            current["tokens"].append(total)
            current["computed_tokens"].append(infos[0].computed_tokens)
            current["max_abs_diff"] = max(current["max_abs_diff"], float(abs(full - vectors[0]).max()))
            if len(current["full_ms"]) >= reps:
                inc, ful = statistics.median(current["incremental_ms"]), statistics.median(current["full_ms"])
                current.update(incremental_median_ms=inc, full_median_ms=ful, speedup=ful / inc,
                               mean_tokens=statistics.mean(current["tokens"]),
                               mean_computed=statistics.mean(current["computed_tokens"]))
                rows.append(current)
                current = None
                if not pending:
                    break
        turns.append(Turn("assistant", turn_text(rng, words, turn_words)))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_index(checkpoint: Path, directory: Path, passages: int) -> tuple[Path, Path]:
    from convret.data.sample_world import COLLECTION, SAMPLE_WORLD_DIR
    from convret.retrieval.encode import collection_items, encode_to_dir
    from convret.retrieval.encoder import Encoder
    from convret.retrieval.index import build_index as faiss_index

    collection = directory / "collection.jsonl"
    with open(Path(SAMPLE_WORLD_DIR) / COLLECTION, encoding="utf-8") as src, open(collection, "w") as dst:
        for i, line in enumerate(src):
            if i >= passages:
                break
            dst.write(line)
    encoder = Encoder.from_checkpoint(checkpoint)
    ids, sequences = collection_items(collection, encoder)
    encode_to_dir(encoder, ids, sequences, directory / "emb", progress=False)
    faiss_index(directory / "emb", directory / "idx", use_gpu=False)
    return directory / "idx", collection


def conversation_turns(client: int, requests: int, turn_words: int, words: list[str], tag: str):
    """Client ``client``'s requests: ``(conversation_id, turns)`` of growing conversations (a user turn, then
    an assistant turn after each answer; a new conversation every 8 user turns)."""
    rng = random.Random(client)
    turns: list[dict] = []
    conv = 0
    for _ in range(requests):
        if len(turns) >= 16:
            turns, conv = [], conv + 1
        turns.append({"role": "user", "text": turn_text(rng, words, turn_words)})
        yield f"{tag}-{client}-{conv}", list(turns)
        turns.append({"role": "assistant", "text": turn_text(rng, words, turn_words)})


async def _client(session, url: str, n: int, requests: int, turn_words: int, words: list[str], tag: str,
                  latencies: list[float], errors: list[str]) -> None:
    for conversation_id, turns in conversation_turns(n, requests, turn_words, words, tag):
        body = {"conversation_id": conversation_id, "turns": turns, "top_k": 10}
        started = time.perf_counter()
        async with session.post(url + "/v1/search", json=body) as response:
            text = await response.text()
            latencies.append((time.perf_counter() - started) * 1e3)
            if response.status != 200:
                errors.append(f"{response.status} {text[:200]}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _load(url: str, concurrency: int, requests: int, turn_words: int, words: list[str], tag: str,
                server_pid: int | None = None) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        server_cpu = _cpu_seconds(server_pid) if server_pid else 0.0
        client_cpu = _own_cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(_client(session, url, n, requests, turn_words, words, tag, latencies, errors)
                               for n in range(concurrency)))
        wall = time.perf_counter() - started
        client_cpu = _own_cpu_seconds() - client_cpu
        server_cpu = (_cpu_seconds(server_pid) - server_cpu) if server_pid else float("nan")
    ordered = sorted(latencies)
    n = max(1, len(latencies))
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "seconds": wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": ordered[len(ordered) // 2], "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "server_cpu_ms_per_request": server_cpu / n * 1e3, "client_cpu_ms_per_request": client_cpu / n * 1e3}


# ------------------------------------------------------------------------------------ 2. encoder batching
def encoder_batching(checkpoint: Path, concurrency: list[int], requests: int, turn_words: int) -> list[dict]:
    """Per-request forward time of the service's request mix, one forward per request vs one per round."""
    from convret.retrieval.encoder import Encoder
    from convret.retrieval.session_encoder import SessionEncoder

    encoder = Encoder.from_checkpoint(checkpoint)
    words = sample_words()
    rows = []
    for c in concurrency:
        one_by_one, batched = SessionEncoder(encoder, cache_mb=1024), SessionEncoder(encoder, cache_mb=1024)
        clients = [list(conversation_turns(n, requests, turn_words, words, f"c{c}")) for n in range(c)]
        single_s = batch_s = diff = 0.0
        count = 0
        for round_ in zip(*clients):
            singles = [one_by_one.session_request(cid, turns) for cid, turns in round_]
            together = [batched.session_request(cid, turns) for cid, turns in round_]
            started = time.perf_counter()
            vectors_one = [one_by_one.encode_requests([r])[0][0] for r in singles]
            single_s += time.perf_counter() - started
            started = time.perf_counter()
            vectors_batch = batched.encode_requests(together)[0]
            batch_s += time.perf_counter() - started
            diff = max(diff, max(float(abs(a - b).max()) for a, b in zip(vectors_one, vectors_batch)))
            count += len(round_)
        rows.append({"concurrency": c, "requests": count, "single_ms_per_request": single_s / count * 1e3,
                     "batched_ms_per_request": batch_s / count * 1e3, "gain": single_s / batch_s,
                     "max_abs_diff": diff,
                     "computed_tokens_per_request": batched.stats.computed_tokens / count,
                     "reused_tokens_per_request": batched.stats.reused_tokens / count})
    return rows


# ------------------------------------------------------------------------------------ 3. the service
def service(checkpoint: Path, index: Path, collection: Path, concurrency: list[int], requests: int,
            turn_words: int, threads: int | None) -> list[dict]:
    words = sample_words()
    rows = []
    for batching in (True, False):
        port = _free_port()
        command = [sys.executable, "-m", "convret", "serve", "--model", str(checkpoint), "--index", str(index),
                   "--collection", str(collection), "--port", str(port), "--log-level", "warning",
                   "--cache-mb", "1024"]
        if threads:
            command += ["--threads", str(threads)]
        if not batching:
            command.append("--no-batching")
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, proc)
            asyncio.run(_load(url, 2, 2, turn_words, words, "warmup"))
            for c in concurrency:
                record = asyncio.run(_load(url, c, requests, turn_words, words, f"b{int(batching)}-c{c}",
                                           server_pid=proc.pid))
                record["batching"] = batching
                rows.append(record)
        finally:
            _stop(proc)
    return rows


# ------------------------------------------------------------------------------------ 4. memory
PASSAGE_CHARS = 500
SEARCHES = 200


def synthetic_collection(path: Path, count: int, words: list[str]) -> None:
    """``count`` passages of about PASSAGE_CHARS characters of sample-world text, ids ``p0``, ``p1``, ..."""
    rng = random.Random(count)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            start = rng.randrange(0, len(words) - 120)
            text = " ".join(words[start : start + 120])[:PASSAGE_CHARS]
            out.write(json.dumps({"id": f"p{i}", "text": text}) + "\n")


def _status_bytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _dict_rss(collection: Path) -> int:
    """RSS that ``{id: (text, title)}`` of the collection adds to a fresh process (the former way)."""
    code = ("import sys; from convret.data import read_collection; "
            "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]); "
            "before = rss(); texts = {p.id: (p.text, p.title or '') for p in read_collection(sys.argv[1])}; "
            "print((rss() - before) * 1024)")
    return int(subprocess.run([sys.executable, "-c", code, str(collection)], check=True, capture_output=True,
                              text=True).stdout.split()[-1])


def memory(checkpoint: Path, work: Path, sizes: list[int], threads: int | None,
           starts: tuple[str, ...] = ("first", "second")) -> list[dict]:
    import numpy as np
    import httpx

    from convret.retrieval.embeddings import write_embeddings
    from convret.retrieval.index import build_index as faiss_index

    words, rows = sample_words(), []
    dim = json.loads((checkpoint / "config.json").read_text())["hidden_size"]
    for count in sizes:
        directory = work / f"rss-{count}"
        directory.mkdir()
        collection = directory / "collection.jsonl"
        synthetic_collection(collection, count, words)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_embeddings(directory / "emb", [f"p{i}" for i in range(count)], vectors)
        del vectors
        faiss_index(directory / "emb", directory / "idx", factory="PQ16")
        shutil.rmtree(directory / "emb")
        record: dict[str, Any] = {"passages": count, "collection_mb": collection.stat().st_size / 2**20}
        for start in starts:
            port = _free_port()
            command = [sys.executable, "-m", "convret", "serve", "--model", str(checkpoint), "--index",
                       str(directory / "idx"), "--collection", str(collection), "--port", str(port),
                       "--log-level", "warning", "--cache-mb", "64"] + (["--threads", str(threads)] if threads else [])
            started = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_ready(url, proc, timeout=1800)
                record[f"{start}_start_s"] = time.perf_counter() - started
                rng_q = random.Random(1)
                with httpx.Client(base_url=url, timeout=60) as client:
                    for i in range(SEARCHES):
                        body = {"turns": [{"role": "user", "text": turn_text(rng_q, words, 12)}], "top_k": 10}
                        response = client.post("/v1/search", json=body)
                        if response.status_code != 200 or len(response.json()["results"]) != 10:
                            raise RuntimeError(f"search {i}: {response.status_code} {response.text[:200]}")
                record[f"{start}_rss_mb"] = _status_bytes(proc.pid, "VmRSS") / 2**20
                record[f"{start}_peak_mb"] = _status_bytes(proc.pid, "VmHWM") / 2**20
            finally:
                _stop(proc)
        record["store_mb"] = (directory / "idx" / "passages.sqlite").stat().st_size / 2**20
        record["dict_mb"] = _dict_rss(collection) / 2**20
        rows.append(record)
        shutil.rmtree(directory)
    return rows


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server's graceful shutdown), then a kill after a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"convret serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("convret serve did not become ready")


def run(args, argv: list[str]) -> int:
    lengths = [int(x) for x in args.lengths.split(",")]
    concurrency = [int(x) for x in args.concurrency.split(",")]
    rss_sizes = [int(x) for x in args.rss_passages.split(",") if x.strip()]
    if args.smoke:
        lengths, args.reps, args.turn_words = [256, 512], 2, 20
        concurrency, args.requests_per_client, args.passages = [1, 4], 3, 40
        rss_sizes = [2000] if rss_sizes else []
    elif args.quick:
        lengths, args.reps = [1024, 4096], 3
        concurrency, args.requests_per_client, args.passages = [1, 8, 32], 8, 200
        rss_sizes = [10000, 100000] if rss_sizes else []
    payload: dict[str, Any] = {"benchmark": NAME, "command": H.command_line("convret bench", argv),
                               "environment": H.environment("cpu"), "hidden": args.hidden, "layers": args.layers,
                               "turn_words": args.turn_words, "reps": args.reps}
    with tempfile.TemporaryDirectory(prefix="convret-bench-serve-") as tmp:
        work = Path(tmp)
        checkpoint = build_checkpoint(work / "ck", args.hidden, args.layers, max(lengths) + 2048)
        payload["per_turn"] = per_turn(checkpoint, lengths, args.turn_words, args.reps)
        payload["encoder_batching"] = encoder_batching(checkpoint, concurrency, args.requests_per_client,
                                                       args.turn_words)
        if not args.no_service:
            index, collection = build_index(checkpoint, work, args.passages)
            payload["service"] = service(checkpoint, index, collection, concurrency, args.requests_per_client,
                                         args.turn_words, args.server_threads)
        else:
            payload["service"] = []
        # --smoke: one start (the store's reuse is what tests/test_serve_store.py checks)
        payload["memory"] = memory(checkpoint, work, rss_sizes, args.server_threads,
                                   ("first",) if args.smoke else ("first", "second"))
    payload["load_average_after"] = list(os.getloadavg())
    diff = max((r["max_abs_diff"] for r in payload["per_turn"] + payload["encoder_batching"]), default=0.0)
    errors = sum(r["errors"] for r in payload["service"])
    payload["equality"] = {"max_abs_diff": diff, "tolerance": TOLERANCE, "passed": diff <= TOLERANCE}
    payload["passed"] = payload["equality"]["passed"] and errors == 0
    payload["plots"] = []
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def format_report(payload: dict) -> str:
    lines = [*H.report_header(payload),
             f"Tiny Qwen2 (hidden {payload['hidden']}, {payload['layers']} layers), fp32, CPU; turns of "
             f"{payload['turn_words']} words.", "",
             f"Per turn: the incremental encoder vs a full re-encode of the same session, medians of "
             f"{payload['reps']} consecutive turns past each length:", ""]
    rows = [[f"{r['target']:,}", f"{r['mean_tokens']:.0f}", f"{r['mean_computed']:.0f}",
             H.fmt_ms(r["incremental_median_ms"]), H.fmt_ms(r["full_median_ms"]), f"x{r['speedup']:.1f}",
             f"{r['max_abs_diff']:.1e}"] for r in payload["per_turn"]]
    lines.append(H.markdown_table(["length", "session tokens", "tokens run per turn", "incremental",
                                   "full re-encode", "speedup", "max |diff|"], rows))
    e = payload["equality"]
    lines += ["", f"Embeddings: max |diff| {e['max_abs_diff']:.1e} (tolerance {e['tolerance']:.0e}): "
                  f"{'pass' if e['passed'] else 'FAIL'}."]
    rows = [[r["concurrency"], r["requests"], f"{r['computed_tokens_per_request']:.0f}",
             f"{r['reused_tokens_per_request']:.0f}", H.fmt_ms(r["single_ms_per_request"]),
             H.fmt_ms(r["batched_ms_per_request"]), f"x{r['gain']:.2f}", f"{r['max_abs_diff']:.1e}"]
            for r in payload.get("encoder_batching", [])]
    if rows:
        lines += ["", "Encoder batching, in process (the service's request mix; each round is every client's next "
                      "request): per request, one forward each vs one forward per round: the encoder's share of "
                      "batching's gain (the service also shares its searches and thread hand-offs per batch):", ""]
        lines.append(H.markdown_table(["clients", "requests", "tokens run", "tokens reused", "one forward each",
                                       "one forward per round", "gain", "max |diff|"], rows))
    if payload["service"]:
        lines += ["", "Service (`convret serve` subprocess, asyncio aiohttp clients on the same machine; growing "
                      "conversations, top_k 10; CPU: milliseconds of CPU time per request, server / clients):", ""]
        by = {(r["batching"], r["concurrency"]): r for r in payload["service"]}
        rows = []
        for c in sorted({r["concurrency"] for r in payload["service"]}):
            on, off = by.get((True, c)), by.get((False, c))
            rows.append([c, f"{on['requests_per_s']:.1f}", H.fmt_ms(on["p50_ms"]), H.fmt_ms(on["p99_ms"]),
                         _cpu_cell(on), f"{off['requests_per_s']:.1f}", H.fmt_ms(off["p50_ms"]),
                         H.fmt_ms(off["p99_ms"]), _cpu_cell(off),
                         f"x{on['requests_per_s'] / off['requests_per_s']:.2f}", on["errors"] + off["errors"]])
        lines.append(H.markdown_table(["clients", "batching req/s", "p50", "p99", "CPU", "no batching req/s", "p50",
                                       "p99", "CPU", "batching gain", "errors"], rows))
    if payload.get("memory"):
        lines += ["", f"Memory: `convret serve` over synthetic collections of {PASSAGE_CHARS}-character passages "
                      f"(a PQ16 index: 16 bytes per passage), RSS after {SEARCHES} searches and the peak; first "
                      "start = the passage store built, second = reused; the last column is the RSS a dict of "
                      "the collection's texts adds to a process (what the service held before the store):", ""]
        rows = [[f"{r['passages']:,}", f"{r['collection_mb']:.0f} MiB", f"{r['store_mb']:.0f} MiB",
                 f"{r['first_rss_mb']:.0f} / {r['first_peak_mb']:.0f} MiB",
                 f"{r['second_rss_mb']:.0f} / {r['second_peak_mb']:.0f} MiB" if "second_rss_mb" in r else "-",
                 f"{r['first_start_s']:.0f} s / " + (f"{r['second_start_s']:.0f} s" if "second_start_s" in r else "-"),
                 f"{r['dict_mb']:.0f} MiB"]
                for r in payload["memory"]]
        lines.append(H.markdown_table(["passages", "collection", "passage store", "RSS / peak, first start",
                                       "RSS / peak, second start", "ready after (first / second)",
                                       "dict of texts"], rows))
    return "\n".join(lines)


def _cpu_cell(record: dict) -> str:
    return f"{record['server_cpu_ms_per_request']:.2f} / {record['client_cpu_ms_per_request']:.2f}"
