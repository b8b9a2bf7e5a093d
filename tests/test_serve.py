"""``convret serve`` against real uvicorn processes on 127.0.0.1 (random free port, bounded waits, always killed).

- every endpoint; ``/v1/search`` equals ``convret encode`` + ``convret search`` (ids and scores) for the same
  sessions, asked turn by turn under their conversation ids (so the cache is used);
- every bad input answered with its 4xx while a concurrent good client sees no error;
- the bind check (0.0.0.0 without a key refuses to start) and the API key on a non-loopback bind (only ever
  connecting to 127.0.0.1);
- SIGTERM while requests wait in a batch: every one is answered, the process exits 0;
- a load test: 8 concurrent clients, 400 requests of growing conversations, zero errors, the cache within its
  budget at every poll.
"""
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from convret.data import read_conversations  # noqa: E402
from convret.retrieval._data import load_run  # noqa: E402
from _serve_world import Server, base_args, build_world, free_port  # noqa: E402

CACHE_MB = 0.15


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(world):
    port = free_port()
    srv = Server(base_args(world, port) + ["--cache-mb", str(CACHE_MB), "--max-turns", "40", "--max-tokens", "400",
                                           "--max-body-bytes", "20000", "--max-top-k", "50", "--max-wait-ms", "2"],
                 port)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def turns_of(turn):
    return [{"role": t.role, "text": t.text} for t in turn.history] + [{"role": "user", "text": turn.query}]


def test_search_equals_encode_and_search(server, world):
    want = load_run(world["run"])
    client = httpx.Client(base_url=server.url, timeout=30)
    infos = []
    for turn in read_conversations(world["eval"]):
        r = client.post("/v1/search", json={"conversation_id": f"conv-{turn.conv_id}", "turns": turns_of(turn),
                                            "top_k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        got = [(h["id"], h["score"]) for h in body["results"]]
        expected = sorted(want[turn.qid].items(), key=lambda kv: (-kv[1], kv[0]))
        assert [g[0] for g in got] == [e[0] for e in expected], turn.qid
        assert all(abs(g[1] - e[1]) < 1e-5 for g, e in zip(got, expected))
        assert all(h["text"] for h in body["results"])
        infos.append((turn.turn_id, body["encoding"]))
    later = [enc for turn_id, enc in infos if str(turn_id) != "1"]
    assert later and all(e["cache"] == "hit" and e["reused_tokens"] > 0 for e in later), later
    assert all(e["reused_tokens"] + e["computed_tokens"] == e["total_tokens"] for _, e in infos)


def test_encode_health_metrics_docs(server, world):
    import numpy as np

    from convret.retrieval.embeddings import read_embeddings

    ids, vectors, _ = read_embeddings(world["emb"])
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(world["collection"])}
    client = httpx.Client(base_url=server.url, timeout=30)
    turn = next(iter(read_conversations(world["eval"])))
    r = client.post("/v1/encode", json={"passages": [{"text": texts[ids[0]]}, {"text": texts[ids[3]]}],
                                        "sessions": [{"turns": turns_of(turn)}]})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(np.array(body["passages"]), vectors[[0, 3]], atol=1e-5)
    assert len(body["sessions"]) == 1 and len(body["sessions"][0]) == body["dim"] == vectors.shape[1]
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["passages"] == len(ids)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    for name in ("convret_requests_total", "convret_request_seconds_bucket", "convret_cache_hits_total",
                 "convret_cache_misses_total", "convret_cache_evictions_total", "convret_cache_bytes",
                 "convret_batch_requests_bucket"):
        assert name in metrics.text, name
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/search", "/v1/encode"}


GOOD = {"turns": [{"role": "user", "text": "w1 w2 w3"}], "top_k": 3}
BAD = [  # (body bytes or json, status, words the answer must contain)
    (b'{"turns": [', 400, "malformed JSON"),
    (b'\xff\xfe{"turns": []}', 400, "UTF-8"),
    ({"turns": "w1"}, 422, "turns"),
    ({"turns": []}, 422, "turns"),
    ({"turns": [{"role": "user", "text": "   "}]}, 422, "empty"),
    ({"turns": [{"role": "system", "text": "w1"}]}, 422, "role"),
    ({"turns": [{"role": "user", "text": "w1"}, {"role": "assistant", "text": "w2"}]}, 422, "user"),
    ({"turns": [{"role": "user", "text": "w1"}], "top_k": "many"}, 422, "top_k"),
    ({"turns": [{"role": "user", "text": "w1"}], "top_k": 51}, 422, "max_top_k"),
    ({"turns": [{"role": "user", "text": "w1"}], "top_k": 0}, 422, "top_k"),
    ({"turns": [{"role": "user", "text": "w1"}] * 41}, 422, "max_turns"),
    ({"turns": [{"role": "user", "text": " ".join(["w1"] * 600)}]}, 413, "max_tokens"),
    ({"turns": [{"role": "user", "text": "w1 " * 8000}]}, 413, "max_body_bytes"),
    ({"turns": [{"role": "user", "text": "w1"}], "index": "/etc/passwd"}, 422, "index"),
    ({"turns": [{"role": "user", "text": "w1"}], "conversation_id": "../../etc/passwd"}, 422, "conversation_id"),
    ([1, 2], 422, "body"),
]


def test_bad_inputs_get_4xx_and_a_concurrent_client_is_unaffected(server):
    stop = threading.Event()
    good = {"ok": 0, "errors": []}

    def good_client():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                turns = [{"role": "user", "text": f"w{i % 50} w3"}]
                r = c.post("/v1/search", json={"conversation_id": f"good{i % 3}", "turns": turns, "top_k": 3})
                if r.status_code == 200 and len(r.json()["results"]) == 3:
                    good["ok"] += 1
                else:
                    good["errors"].append((r.status_code, r.text))

    thread = threading.Thread(target=good_client)
    thread.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for body, status, words in BAD:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = c.post("/v1/search", content=content, headers={"content-type": "application/json"})
                assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], r.text)
                assert words.lower() in r.text.lower(), r.text
            assert c.post("/v1/encode", json={}).status_code == 422
            assert c.post("/v1/encode", json={"passages": [{"text": " "}]}).status_code == 422
            assert c.post("/v1/search", json=GOOD).status_code == 200
    finally:
        stop.set()
        thread.join(30)
    assert good["errors"] == [] and good["ok"] > 0


def test_load_8_clients_400_requests_cache_within_budget(server):
    budget = CACHE_MB * 2**20
    seen_bytes, errors = [], []
    done = threading.Event()

    def poll():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not done.is_set():
                seen_bytes.append(c.get("/healthz").json()["cache"]["bytes"])
                time.sleep(0.05)

    def client(n):
        reused = 0
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for conv in range(5):  # 5 conversations of 10 turns: 50 requests per client
                turns = []
                for t in range(10):
                    turns.append({"role": "user", "text": f"w{(n * 7 + t) % 60} w{(conv + t) % 60} w5"})
                    r = c.post("/v1/search", json={"conversation_id": f"load-{n}-{conv}", "turns": turns,
                                                   "top_k": 5})
                    if r.status_code != 200:
                        errors.append((r.status_code, r.text))
                        return reused
                    reused += r.json()["encoding"]["reused_tokens"]
                    turns.append({"role": "assistant", "text": f"w{(n + t) % 60} w9"})
        return reused

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            reused = list(pool.map(client, range(8)))
    finally:
        done.set()
        poller.join(30)
    elapsed = time.monotonic() - started
    assert errors == []
    assert elapsed < 60, elapsed
    assert seen_bytes and max(seen_bytes) <= budget
    assert sum(reused) > 0
    text = httpx.get(server.url + "/metrics").text
    metric = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert metric["convret_cache_evictions_total"] > 0  # the budget was tight enough to matter
    assert metric["convret_cache_bytes"] <= budget
    assert metric["convret_batch_requests_count"] < metric["convret_requests_total" + '{endpoint="/v1/search",status="200"}']


def test_non_loopback_bind_needs_an_api_key(world, tmp_path, capsys):
    from convret.serve.main import is_loopback, main as serve_main

    port = str(free_port())
    args = ["--model", world["model"], "--index", world["index"], "--collection", world["collection"], "--port", port]
    assert serve_main([*args, "--host", "0.0.0.0"]) == 2  # refused before anything is loaded or bound
    assert "refusing to bind 0.0.0.0 without an API key" in capsys.readouterr().err
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    assert serve_main([*args, "--host", "0.0.0.0", "--api-key-file", str(short)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert serve_main([*args, "--host", "10.1.2.3", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org"))


def test_api_key_and_sigterm_drains_in_flight_requests(world, tmp_path):
    key = "k" * 10 + "secret-0123456789"
    key_file = tmp_path / "api.key"
    key_file.write_text(key + "\n")
    port = free_port()
    # binds every interface, but the test only ever connects to 127.0.0.1; a batch waits up to 3 s for company,
    # so that all 12 requests are in flight when SIGTERM arrives
    srv = Server(base_args(world, port) + ["--host", "0.0.0.0", "--api-key-file", str(key_file),
                                           "--max-wait-ms", "3000", "--always-wait"], port)
    try:
        srv.wait_ready()
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/v1/search", json=GOOD).status_code == 401
            assert c.post("/v1/search", json=GOOD, headers={"Authorization": "Bearer " + "x" * 27}).status_code == 401
            assert c.post("/v1/search", json=GOOD, headers={"Authorization": key}).status_code == 401
            assert c.get("/metrics").status_code == 401
            assert c.get("/healthz").status_code == 200
            assert c.post("/v1/search", json=GOOD, headers=auth).status_code == 200

        def one(i):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                r = c.post("/v1/search", headers=auth, json={"conversation_id": f"t{i}", "top_k": 3,
                                                             "turns": [{"role": "user", "text": f"w{i} w2"}]})
                return r.status_code, len(r.json().get("results", []))

        def in_flight(c):
            text = c.get("/metrics", headers=auth).text
            return next(float(line.split()[1]) for line in text.splitlines()
                        if line.startswith("convret_requests_in_flight "))

        with ThreadPoolExecutor(12) as pool, httpx.Client(base_url=srv.url, timeout=30) as c:
            futures = [pool.submit(one, i) for i in range(12)]
            deadline = time.monotonic() + 30
            while in_flight(c) < 13 and time.monotonic() < deadline:  # 12 waiting for their batch + this one
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=60) for f in futures]
        assert answers == [(200, 3)] * 12
        # uvicorn re-raises the signal once it has shut down gracefully (the exit status of a SIGTERM)
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        srv.stop()


def test_a_failing_request_fails_alone_in_its_batch(world):
    """The batch path itself: one job whose forward raises (a token id outside the vocabulary) gets its error,
    the others of the same batch their results (equal to their results alone)."""
    from convret.retrieval.session_encoder import PassageRequest
    from convret.serve.service import Job, SearchService

    service = SearchService.load(world["model"], world["index"], world["collection"], cache_mb=1)
    good = [Job([service.encoder.session_request(f"c{i}", [{"role": "user", "text": f"w{i} w7"}])], top_k=3)
            for i in range(3)]
    bad = Job([PassageRequest([10**7])])
    results = service.run_batch([good[0], bad, good[1], good[2]])
    assert isinstance(results[1], Exception)
    alone = SearchService.load(world["model"], world["index"], world["collection"], cache_mb=1)
    for job, result in zip(good, [results[0], results[2], results[3]]):
        expected = alone.run_batch([job])[0]
        assert [h[0] for h in result.hits] == [h[0] for h in expected.hits]


def _byte_fallback_metaspace_tokenizer():
    """The worst case for the bound: a Metaspace BPE with byte fallback whose vocabulary holds the 256 byte
    tokens only, so that every ``▁`` (a space, or the one prepended) costs three tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab["<unk>"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture(scope="module")
def bound_tokenizers():
    from _model_matrix import FAMILIES, family_tokenizer

    return {name: family_tokenizer(name) for name in ("qwen2.5", "llama3", "mistral")} | {
        "byte-fallback": _byte_fallback_metaspace_tokenizer()}


def test_token_upper_bound_holds_for_every_kind_of_tokenizer(bound_tokenizers):
    """The server skips counting tokens when this bound is within ``max_tokens``: it must never be below the
    real count (byte-level BPE, Metaspace BPE, byte fallback), whatever the text."""
    from hypothesis import given, settings, strategies as st

    from convret.serve.app import token_upper_bound

    pieces = st.sampled_from(list("ab ▁\n\t\u00e9\u4e2d\u0301") + ["\U0001F600", "  ", "\r\n", "w1 "])
    text = st.lists(pieces, max_size=40).map("".join)

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(text, min_size=1, max_size=3))
    def check(texts):
        for name, tokenizer in bound_tokenizers.items():
            count = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)
            assert count <= token_upper_bound(texts), (name, texts, count)

    check()
    # why not "one token per byte": with byte fallback a space costs the three bytes of its ▁
    worst = bound_tokenizers["byte-fallback"]
    assert len(worst("a  b", add_special_tokens=False).input_ids) == 11 > len("a  b".encode()) + 1


def test_the_service_sorts_the_docids_once_not_at_every_batch(world, monkeypatch):
    """Ties are broken by docid: the order of the ids is computed when the service loads. Sorting 8.8 M ids at
    every batch would cost seconds per request; the answers are those of ``convret search``."""
    import convret.retrieval.search as search_module
    from convret.serve.service import Job, SearchService

    service = SearchService.load(world["model"], world["index"], world["collection"], cache_mb=1)
    calls = []
    real = search_module.id_ranks
    monkeypatch.setattr(search_module, "id_ranks", lambda ids: calls.append(len(ids)) or real(ids))
    turns = list(read_conversations(world["eval"]))
    jobs = [Job([service.encoder.session_request(None, turns_of(turn))], top_k=5) for turn in turns]
    results = service.run_batch(jobs)
    assert calls == []
    want = load_run(world["run"])
    for turn, result in zip(turns, results):
        expected = sorted(want[turn.qid].items(), key=lambda kv: (-kv[1], kv[0]))
        assert [pid for pid, _ in result.hits] == [pid for pid, _ in expected], turn.qid
