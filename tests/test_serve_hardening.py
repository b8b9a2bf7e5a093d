"""``convret serve`` under the conditions its users create: browsers (CORS with a key), several tenants, health
probes from strangers, overload, slow and vanished clients, shutdown, a flood. Every server listens on 127.0.0.1;
every wait is bounded. (Requests generated from the OpenAPI schema: test_serve_fuzz.py.)

Most tests run the app in a uvicorn thread of this process (real HTTP, one model loaded for all of them, so that
the work a request caused is read from the encoder's counters); the flood test runs `convret serve` in a
subprocess (the server's own RSS).
"""
import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from convret.data import read_conversations  # noqa: E402
from convret.retrieval._data import load_run  # noqa: E402
from _serve_world import AppServer, Server, base_args, build_world, free_port  # noqa: E402


KEY_A = "tenant-a-0123456789abcdef"
KEY_B = "tenant-b-0123456789abcdef"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}
ORIGIN = "https://app.example"
SEARCH = {"turns": [{"role": "user", "text": "w1 w2 w3"}], "top_k": 3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serve-hardening"))


@pytest.fixture(scope="module")
def service(world):
    from convret.serve.service import SearchService

    return SearchService.load(world["model"], world["index"], world["collection"], cache_mb=1)


def make_app(service, **settings):
    from convret.serve.app import ServeSettings, create_app

    return create_app(service, ServeSettings(**settings))


def admission(**fields):
    from convret.serve.admission import Admission

    return Admission(**fields)


def metric(url, name, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def turns_of(turn):
    return [{"role": t.role, "text": t.text} for t in turn.history] + [{"role": "user", "text": turn.query}]


# ------------------------------------------------------------------------------------ authentication, CORS
def test_cors_preflight_with_an_api_key(service):
    """A browser's preflight never carries Authorization: it must reach CORS (and be answered there), not 401.
    The actual requests carry the key; a 401 carries the CORS headers too, so that the page can read it."""
    app = make_app(service, api_keys=[KEY_A], cors_origins=[ORIGIN])
    with AppServer(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        preflight = c.options("/v1/search", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        other = c.options("/v1/search", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        r = c.post("/v1/search", json=SEARCH, headers={"Origin": ORIGIN, **AUTH_A})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = c.post("/v1/search", json=SEARCH, headers={"Origin": ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
        assert c.options("/v1/search").status_code == 401  # not a preflight: the key is asked for


def test_healthz_tells_a_stranger_only_that_it_is_alive(service, world):
    app = make_app(service, api_keys=[KEY_A])
    with AppServer(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        stranger = c.get("/healthz")
        assert stranger.status_code == 200 and stranger.json() == {"status": "ok"}
        member = c.get("/healthz", headers=AUTH_A)
        body = member.json()
        assert body["status"] == "ok" and body["passages"] == len(service.doc_ids) and body["dim"] > 0
        assert body["admission"]["max_concurrent_requests"] == 512 and "cache" in body
        for path in (world["model"], world["index"], world["collection"], str(world["dir"])):
            assert path not in member.text and path not in stranger.text


def test_conversation_ids_are_namespaced_by_api_key(service):
    """Two tenants using the same conversation id: the second never reuses (nor learns the length of) the
    first's cached session; each tenant's own session is a hit."""
    app = make_app(service, api_keys=[KEY_A, KEY_B])
    body = {"conversation_id": "shared-id", "top_k": 3,
            "turns": [{"role": "user", "text": "w4 w5 w6 w7"}, {"role": "assistant", "text": "w8 w9"},
                      {"role": "user", "text": "w10 w11"}]}
    with AppServer(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        first = c.post("/v1/search", json=body, headers=AUTH_A).json()["encoding"]
        again = c.post("/v1/search", json=body, headers=AUTH_A).json()["encoding"]
        other = c.post("/v1/search", json=body, headers=AUTH_B).json()["encoding"]
        encoded = c.post("/v1/encode", json={"sessions": [{"conversation_id": "shared-id", "turns": body["turns"]}]},
                         headers=AUTH_B).json()["encodings"][0]
    assert first["cache"] == "miss" and again["cache"] == "hit" and again["reused_tokens"] > 0
    assert other["cache"] == "miss" and other["reused_tokens"] == 0
    assert encoded["cache"] == "hit"  # tenant B's own session, cached by its search


def test_api_key_file_holds_one_key_per_line(tmp_path):
    from convret.serve.auth import read_api_keys

    path = tmp_path / "keys"
    path.write_text(f"# tenants\n{KEY_A}\n\n  {KEY_B}  \n")
    assert read_api_keys(str(path)) == [KEY_A, KEY_B]
    path.write_text(f"{KEY_A}\nshort\n")
    with pytest.raises(ValueError, match=r"keys:2: a key must be at least 16"):
        read_api_keys(str(path))
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no key"):
        read_api_keys(str(path))


# ------------------------------------------------------------------------------------ the app itself
def test_the_lifespan_runs_twice(service):
    """An app started, stopped and started again (a test client per test, a server restarted in process)."""
    from fastapi.testclient import TestClient

    app = make_app(service)
    for _ in range(3):
        with TestClient(app) as c:
            r = c.post("/v1/search", json=SEARCH)
            assert r.status_code == 200, r.text


def test_token_estimates_run_off_the_event_loop(service, monkeypatch):
    """estimate_new_tokens walks the cached session's tokens in Python: it must not run on the event loop."""
    app = make_app(service)
    calls = []
    real = service.encoder.estimate_new_tokens

    def record(request):
        try:
            asyncio.get_running_loop()
            calls.append("event loop")
        except RuntimeError:
            calls.append("thread")
        return real(request)

    monkeypatch.setattr(service.encoder, "estimate_new_tokens", record)
    with AppServer(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/search", json={**SEARCH, "conversation_id": "estimate"}).status_code == 200
        assert c.post("/v1/encode", json={"passages": [{"text": "w1"}]}).status_code == 200
    assert calls == ["thread", "thread"]


def test_flags_reach_the_settings_by_name(world, monkeypatch):
    """`convret serve`'s flags set the settings by field name: with the fields of Limits, Admission and
    ServeSettings in reversed order, every flag still reaches its own field."""
    import uvicorn

    import convret.serve.app as app_module
    import convret.serve.service as service_module
    from convret.serve import main as serve_main

    for module_name in ("convret.serve.app", "convret.serve.limits", "convret.serve.admission"):
        module = pytest.importorskip(module_name)
        for name in ("Limits", "Admission", "ServeSettings"):
            original = getattr(module, name, None)
            if original is not None and dataclasses.is_dataclass(original):
                fields = [(f.name, f.type, f) for f in reversed(dataclasses.fields(original))]
                monkeypatch.setattr(module, name, dataclasses.make_dataclass(name, [
                    (n, t, dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING else
                     dataclasses.field(default_factory=f.default_factory)) for n, t, f in fields]))
    captured = {}
    monkeypatch.setattr(service_module.SearchService, "load", classmethod(lambda cls, *a, **k: type(
        "Stub", (), {"doc_ids": []})()))
    monkeypatch.setattr(app_module, "create_app", lambda service, settings: captured.setdefault("s", settings))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    flags = {"--max-body-bytes": 1001, "--max-turns": 1002, "--max-text-chars": 1003, "--max-tokens": 1004,
             "--max-top-k": 1005, "--max-items": 1006, "--max-batch-tokens": 1007, "--max-batch-requests": 1008,
             "--max-wait-ms": 1009, "--max-concurrent-requests": 1010, "--max-queued-tokens": 1011,
             "--request-timeout": 1012, "--max-connections": 1013}
    argv = ["--model", world["model"], "--index", world["index"], "--collection", world["collection"]]
    assert serve_main.main(argv + [str(x) for pair in flags.items() for x in pair]) == 0
    s = captured["s"]
    got = {"--max-body-bytes": s.limits.max_body_bytes, "--max-turns": s.limits.max_turns,
           "--max-text-chars": s.limits.max_text_chars, "--max-tokens": s.limits.max_tokens,
           "--max-top-k": s.limits.max_top_k, "--max-items": s.limits.max_items,
           "--max-batch-tokens": s.max_batch_tokens, "--max-batch-requests": s.max_batch_requests,
           "--max-wait-ms": s.max_wait_ms,
           "--max-concurrent-requests": getattr(getattr(s, "admission", None), "max_concurrent_requests", None),
           "--max-queued-tokens": getattr(getattr(s, "admission", None), "max_queued_tokens", None),
           "--request-timeout": getattr(getattr(s, "admission", None), "request_timeout", None),
           "--max-connections": getattr(getattr(s, "admission", None), "max_connections", None)}
    assert got == flags


# ------------------------------------------------------------------------------------ admission control
def _post_all(url, bodies, timeout=30, headers=None):
    def one(body):
        with httpx.Client(base_url=url, timeout=timeout) as c:
            r = c.post("/v1/search", json=body, headers=headers)
            return r.status_code, r.headers.get("retry-after"), r.text

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = []
        for body in bodies:
            futures.append(pool.submit(one, body))
            time.sleep(0.05)  # in order: the first ones are admitted first
        return [f.result(timeout=timeout + 10) for f in futures]


def test_overload_is_shed_with_503_and_retry_after(service):
    """Two requests admitted at once; the others answered 503 with Retry-After at once; /healthz answers
    promptly all the while."""
    app = make_app(service, admission=admission(max_concurrent_requests=2), always_wait=True, max_wait_ms=1500)
    latencies = []
    with AppServer(app) as url:
        done = threading.Event()

        def probe():
            with httpx.Client(base_url=url, timeout=5) as c:
                c.get("/healthz")  # the connection opened and the app warm before timing
                while not done.is_set():
                    started = time.monotonic()
                    assert c.get("/healthz").status_code == 200
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            answers = _post_all(url, [{**SEARCH, "conversation_id": f"over{i}"} for i in range(6)])
        finally:
            done.set()
            prober.join(10)
        assert metric(url, 'convret_requests_shed_total{reason="overloaded"}') == 4
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 200, 503, 503, 503, 503], answers
    for status, retry_after, text in answers:
        if status == 503:
            assert int(retry_after) >= 1 and "max_concurrent_requests" in text
    assert latencies and max(latencies) < 1.0, max(latencies)


def test_the_batch_queue_is_bounded_in_tokens(service):
    one = service.encoder.session_request(None, SEARCH["turns"])
    cost = len(one.tokens)
    app = make_app(service, admission=admission(max_queued_tokens=cost + cost // 2), always_wait=True,
                   max_wait_ms=1500)
    with AppServer(app) as url:
        answers = _post_all(url, [SEARCH] * 3)
        assert metric(url, 'convret_requests_shed_total{reason="queue_full"}') == 2
    assert [status for status, _, _ in answers] == [200, 503, 503], answers
    assert all("max_queued_tokens" in text and int(retry) >= 1 for status, retry, text in answers if status == 503)


def test_request_timeout_answers_503_and_its_work_is_never_run(service):
    app = make_app(service, admission=admission(request_timeout=0.5), always_wait=True, max_wait_ms=2000)
    with AppServer(app) as url:
        forwards = service.encoder.stats.forwards
        started = time.monotonic()
        r = httpx.post(url + "/v1/search", json=SEARCH, timeout=30)
        assert r.status_code == 503 and "request_timeout=0.5" in r.text and int(r.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 1.5
        time.sleep(2.5)  # the batch it was in has formed by now
        assert service.encoder.stats.forwards == forwards
        assert metric(url, "convret_skipped_jobs_total") == 1
        assert metric(url, 'convret_requests_shed_total{reason="timeout"}') == 1


def test_a_client_that_goes_is_not_computed(service):
    app = make_app(service, always_wait=True, max_wait_ms=1500)
    with AppServer(app) as url:
        forwards = service.encoder.stats.forwards
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/search", json=SEARCH, timeout=0.3)
        time.sleep(2.0)
        assert service.encoder.stats.forwards == forwards
        assert metric(url, 'convret_requests_shed_total{reason="client_gone"}') == 1
        assert metric(url, "convret_skipped_jobs_total") == 1
        assert httpx.post(url + "/v1/search", json=SEARCH, timeout=30).status_code == 200  # still serving


def test_a_body_without_a_length_is_bounded_while_it_streams(service):
    """A chunked body (no Content-Length) of 4 MB against a 2,000-byte limit: refused with 413 once 2,000 bytes
    have arrived (or the connection closed on the sender), and the server goes on serving."""
    from convret.serve.limits import Limits

    app = make_app(service, limits=Limits(max_body_bytes=2000))

    def chunks():
        for _ in range(4000):
            yield b" " * 1000

    with AppServer(app) as url:
        try:
            r = httpx.post(url + "/v1/search", content=chunks(), timeout=30,
                           headers={"content-type": "application/json"})
            assert r.status_code == 413 and "max_body_bytes=2000" in r.text
        except httpx.TransportError:
            pass  # the server answered and closed while the client was still sending
        assert httpx.post(url + "/v1/search", json=SEARCH, timeout=30).status_code == 200


def test_graceful_timeout_drops_queued_work_and_exits_in_time(service):
    """Shutdown (uvicorn's: what SIGTERM starts; test_serve.py sends a real one) with three requests waiting in a
    batch that forms for 8 s, a graceful timeout of 1 s: when it runs out the requests are answered 503
    (shutting down), their batch never runs, and the server is gone well before the batch would have formed."""
    app = make_app(service, always_wait=True, max_wait_ms=8000)
    server = AppServer(app, timeout_graceful_shutdown=1)
    cost = len(service.encoder.session_request(None, SEARCH["turns"]).tokens)
    with ThreadPoolExecutor(3) as pool:
        url = server.__enter__()
        try:
            futures = [pool.submit(httpx.post, url + "/v1/search", json=SEARCH, timeout=30) for _ in range(3)]
            deadline = time.monotonic() + 20
            while httpx.get(url + "/healthz").json()["admission"]["queued_tokens"] < 3 * cost:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            forwards = service.encoder.stats.forwards
        finally:
            stopping = time.monotonic()
            server.__exit__(None, None, None)
        stopped = time.monotonic() - stopping
        answers = [f.result(timeout=30) for f in futures]
    assert [r.status_code for r in answers] == [503] * 3 and all("shutting down" in r.text for r in answers)
    assert not server.thread.is_alive() and stopped < 4.0, stopped
    time.sleep(0.5)
    assert service.encoder.stats.forwards == forwards  # the queued batch was dropped, not run


# ------------------------------------------------------------------------------------ the flood
def test_flood_every_answer_200_or_503_health_prompt_rss_bounded(world):
    """48 clients with long, growing conversations against a server admitting 8 requests at once and batching
    4: every answer is a 200 or a 503 with Retry-After, none hangs, /healthz answers within a second throughout,
    and the server's RSS stays within 200 MB of its size before the flood."""
    aiohttp = pytest.importorskip("aiohttp")
    port = free_port()
    srv = Server(base_args(world, port) + ["--max-concurrent-requests", "8", "--max-batch-requests", "4",
                                           "--max-queued-tokens", "3000", "--request-timeout", "20",
                                           "--max-connections", "256", "--cache-mb", "4"], port)
    clients, seconds = 48, 8.0
    outcome = {"status": [], "missing_retry_after": 0, "errors": [], "health": [], "rss": []}
    try:
        srv.wait_ready()
        rss_before = srv.rss_bytes()

        async def client(session, n):
            turns, deadline = [], time.monotonic() + seconds
            while time.monotonic() < deadline:
                words = " ".join(f"w{(n * 7 + len(turns) * 3 + i) % 60}" for i in range(40))
                turns.append({"role": "user", "text": words})
                body = {"conversation_id": f"flood-{n}", "turns": turns[-40:], "top_k": 5}
                try:
                    async with session.post(srv.url + "/v1/search", json=body) as r:
                        await r.read()
                        outcome["status"].append(r.status)
                        if r.status == 503 and "Retry-After" not in r.headers:
                            outcome["missing_retry_after"] += 1
                        if r.status == 503:
                            await asyncio.sleep(min(1.0, int(r.headers.get("Retry-After", "1")) / 4))
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    outcome["errors"].append(repr(error))
                turns.append({"role": "assistant", "text": words[::-1]})

        async def probe(session, stop):
            while not stop.is_set():
                started = time.monotonic()
                async with session.get(srv.url + "/healthz") as r:
                    await r.read()
                    outcome["health"].append((r.status, time.monotonic() - started))
                outcome["rss"].append(srv.rss_bytes())
                await asyncio.sleep(0.1)

        async def flood():
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                stop = asyncio.Event()
                prober = asyncio.create_task(probe(session, stop))
                await asyncio.gather(*(client(session, n) for n in range(clients)))
                stop.set()
                await prober

        asyncio.run(flood())
        after = httpx.post(srv.url + "/v1/search", json=SEARCH, timeout=30)
    finally:
        srv.stop()
    print(f"flood: {outcome['status'].count(200)} x 200, {outcome['status'].count(503)} x 503, "
          f"{len(outcome['errors'])} errors; /healthz max {max(t for _, t in outcome['health']):.3f} s over "
          f"{len(outcome['health'])} probes; RSS {rss_before / 2**20:.0f} -> max {max(outcome['rss']) / 2**20:.0f} MiB")
    assert outcome["errors"] == []
    assert set(outcome["status"]) <= {200, 503} and outcome["missing_retry_after"] == 0
    assert outcome["status"].count(200) > 0 and outcome["status"].count(503) > 0, outcome["status"][:20]
    assert all(status == 200 for status, _ in outcome["health"])
    assert len(outcome["health"]) > 10 and max(t for _, t in outcome["health"]) < 1.0, outcome["health"]
    assert max(outcome["rss"]) - rss_before < 200 * 2**20, (rss_before, max(outcome["rss"]))
    assert after.status_code == 200


# ------------------------------------------------------------------------------------ a compat checkpoint
def test_a_chatretriever_compat_checkpoint_serves_what_encode_and_search_give(tmp_path_factory):
    """The service's answers for a chatretriever_compat checkpoint (summary block [separator, EMB..]) equal
    `convret encode` + `convret search`, turn by turn under conversation ids (the cache used)."""
    from _tiny import word_tokenizer
    from convret.serve.service import SearchService

    separator = word_tokenizer().convert_tokens_to_ids("<|im_end|>")
    compat = build_world(tmp_path_factory.mktemp("serve-compat"), chatretriever_compat=True,
                         separator_token="<|im_end|>", separator_token_id=separator)
    service = SearchService.load(compat["model"], compat["index"], compat["collection"], cache_mb=1)
    want = load_run(compat["run"])
    with AppServer(make_app(service)) as url, httpx.Client(base_url=url, timeout=30) as c:
        caches = []
        for turn in read_conversations(compat["eval"]):
            body = c.post("/v1/search", json={"conversation_id": f"c{turn.conv_id}", "turns": turns_of(turn),
                                              "top_k": 5}).json()
            expected = sorted(want[turn.qid].items(), key=lambda kv: (-kv[1], kv[0]))
            assert [h["id"] for h in body["results"]] == [pid for pid, _ in expected], turn.qid
            assert all(abs(h["score"] - s) < 1e-5 for h, (_, s) in zip(body["results"], expected))
            caches.append(body["encoding"]["cache"])
    assert caches.count("hit") == len(caches) - 4  # every turn after a conversation's first
