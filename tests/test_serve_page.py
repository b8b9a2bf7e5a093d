"""The exploration page of ``convret serve`` (``GET /``) and the data endpoints it calls.

- over HTTP: the page's files are served without a key, with a strict Content-Security-Policy, and hold no inline
  script, style or event handler; ``/v1/eval/sessions``, ``/v1/eval/session`` and ``/v1/qrels`` answer what
  convret's readers read from ``--eval-file`` and ``--qrels``, under the API key like every ``/v1`` route;
  ``--no-page``; the flags refused with their reason;
- in a real browser (the system's Chromium driven by playwright, against a ``convret serve`` subprocess on
  127.0.0.1; the keyed server in this process): two typed turns, the results as the API answers them, the
  session's cached tokens reused at the second turn; a passage and an utterance holding ``<script>`` / ``<img
  onerror>`` shown as text, no script run; an evaluation session replayed with its judged relevance; with an API
  key configured, a 401 shown without the key, results with it. Skipped, with the reason, without playwright or
  /usr/bin/chromium.
"""
import os
import re
import shutil

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from convret.cli import main as cli  # noqa: E402
from convret.retrieval import _data  # noqa: E402
from _serve_world import AppServer, Server, base_args, build_world, free_port  # noqa: E402

KEY = "page-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
XSS_TEXT = '<script>window.__pwned = "script"</script> w1 w2 <img src=x onerror="window.__pwned = \'img\'"> w3'
XSS_PASSAGE = {"id": "xss", "text": XSS_TEXT, "title": "<b onmouseover=\"window.__pwned='title'\">bold</b>"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serve-page"), extra_passages=[XSS_PASSAGE], n_conv=3, turns=3)


@pytest.fixture(scope="module")
def service(world):
    from convret.serve.service import SearchService

    return SearchService.load(world["model"], world["index"], world["collection"], cache_mb=1)


def _app(service, world, keys=(), page=True, eval_file=True, qrels=True):
    from convret.serve.app import ServeSettings, create_app
    from convret.serve.page import EvalSet

    evalset = EvalSet.load(world["eval"], qrels=world["qrels"] if qrels else None) if eval_file else None
    return create_app(service, ServeSettings(api_keys=list(keys), page=page), evalset)


# ---------------------------------------------------------------------------------------------- over HTTP
def test_the_page_is_served_without_a_key_with_a_strict_csp_and_no_inline_code(service, world):
    from convret.serve.page import CONTENT_SECURITY_POLICY

    with AppServer(_app(service, world, keys=[KEY])) as url:
        client = httpx.Client(base_url=url, timeout=30)
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert csp == CONTENT_SECURITY_POLICY
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'" and directives["connect-src"] == "'self'"
        assert "unsafe" not in csp and "*" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        html = page.text
        assert '<meta name="convret-auth" content="required">' in html
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts), scripts
        assert "<style" not in html and not re.search(r"\sstyle=", html)
        assert not re.search(r"\son[a-z]+\s*=", html, re.I), "an inline event handler"
        for name, media in (("page.js", "text/javascript"), ("page.css", "text/css")):
            r = client.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
            assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        # the data is not open: every /v1 route of the page asks for the key
        for path in ("/v1/eval/sessions", "/v1/eval/session?conv_id=0", "/v1/qrels?qid=0_1", "/static/other.js"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        assert client.get("/v1/eval/sessions", headers=AUTH).status_code == 200
        assert client.get("/static/other.js", headers=AUTH).status_code == 404
    with AppServer(_app(service, world)) as url:
        assert '<meta name="convret-auth" content="none">' in httpx.get(url + "/").text


def test_the_script_never_parses_text_as_html():
    """A lint of the shipped script: no API that parses a string as HTML or code (the browser test shows the
    escaping; this keeps the next edit from reaching for innerHTML)."""
    from importlib import resources

    script = resources.files("convret").joinpath("resources", "page", "page.js").read_text()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                      "setTimeout(\"", "DOMParser", "createContextualFragment"):
        assert forbidden not in script, forbidden


def test_the_eval_endpoints_answer_what_the_readers_read(service, world):
    turns = list(_data.iter_conversations(world["eval"]))
    qrels = _data.load_qrels(world["qrels"])
    with AppServer(_app(service, world)) as url:
        client = httpx.Client(base_url=url, timeout=30)
        listing = client.get("/v1/eval/sessions").json()
        conv_ids = list(dict.fromkeys(t.conv_id for t in turns))
        assert listing["loaded"] and listing["qrels"]
        assert [s["conv_id"] for s in listing["sessions"]] == conv_ids
        for summary in listing["sessions"]:
            mine = [t for t in turns if t.conv_id == summary["conv_id"]]
            assert summary["turns"] == len(mine) and summary["first_query"] == mine[0].query
            body = client.get("/v1/eval/session", params={"conv_id": summary["conv_id"]}).json()
            assert [t["qid"] for t in body["turns"]] == [t.qid for t in mine]
            for got, want in zip(body["turns"], mine):
                assert got["query"] == want.query and got["rewrite"] == want.rewrite
                assert [(h["role"], h["text"]) for h in got["history"]] == [(h.role, h.text) for h in want.history]
                r = client.get("/v1/qrels", params={"qid": want.qid})
                assert r.status_code == 200 and r.json() == {"qid": want.qid, "judgments": qrels.get(want.qid, {})}
        assert any(t["history"] for t in body["turns"])
        assert client.get("/v1/eval/session", params={"conv_id": "nope"}).status_code == 404
        assert "no such query" in client.get("/v1/qrels", params={"qid": "nope"}).json()["detail"]
        assert client.get("/v1/eval/session").status_code == 422
        metrics = client.get("/metrics").text  # each endpoint of the page counted under its own label
        for endpoint in ("/v1/eval/sessions", "/v1/eval/session", "/v1/qrels"):
            assert f'convret_requests_total{{endpoint="{endpoint}",status="200"}}' in metrics, endpoint
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/eval/sessions", "/v1/eval/session", "/v1/qrels"} <= paths.keys()
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    with AppServer(_app(service, world, eval_file=False, page=False)) as url:
        client = httpx.Client(base_url=url, timeout=30)
        assert client.get("/v1/eval/sessions").json() == {"loaded": False, "qrels": False, "sessions": []}
        assert "--eval-file" in client.get("/v1/eval/session", params={"conv_id": "0"}).json()["detail"]
        assert client.get("/v1/qrels", params={"qid": "0_1"}).status_code == 404
        assert client.get("/").status_code == 404 and client.get("/static/page.js").status_code == 404
    with AppServer(_app(service, world, qrels=False)) as url:
        client = httpx.Client(base_url=url, timeout=30)
        assert client.get("/v1/eval/sessions").json()["qrels"] is False
        assert "--qrels" in client.get("/v1/qrels", params={"qid": "0_1"}).json()["detail"]


def test_the_flags_are_refused_with_their_reason(world, tmp_path, capsys):
    args = ["serve", "--model", world["model"], "--index", world["index"], "--collection", world["collection"],
            "--port", "0"]
    assert cli([*args, "--qrels", world["qrels"]]) == 2
    assert "--qrels needs --eval-file" in capsys.readouterr().err
    other = tmp_path / "other.qrels"
    other.write_text("q9_9 0 g0_1 1\n")
    assert cli([*args, "--eval-file", world["eval"], "--qrels", str(other)]) == 2
    assert "no query in common" in capsys.readouterr().err
    assert cli([*args, "--eval-file", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert cli([*args, "--eval-file", world["collection"]]) == 2
    assert "not a conversation file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- in a browser
def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs playwright (pip install playwright: the test extra; no `playwright "
                    "install`, the system's Chromium is used)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"the browser test needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def sync_playwright():
    return _browser_or_skip()


@pytest.fixture(scope="module")
def servers(sync_playwright, world, service):
    """`convret serve` in a subprocess with the evaluation file and its qrels, no key; and the same app with an API
    key, served by uvicorn in this process (one model load fewer: the CLI's --api-key-file is test_serve.py's)."""
    port = free_port()
    server = Server(base_args(world, port) + ["--eval-file", world["eval"], "--qrels", world["qrels"],
                                              "--max-wait-ms", "1"], port)
    try:
        with AppServer(_app(service, world, keys=[KEY])) as keyed_url:
            server.wait_ready()
            yield {"open": server.url, "keyed": keyed_url}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(sync_playwright, servers, tmp_path_factory):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


def _open(browser, url):
    page = browser.new_page()
    messages = []
    page.on("console", lambda m: messages.append(m.text))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return page, messages


def _send(page, utterance, reply=""):
    before = page.locator("#results details").count()
    page.fill("#assistant", reply)
    page.fill("#utterance", utterance)
    page.click("#send")
    _wait_turn(page, before + 1)


def _wait_turn(page, n):
    # (no wait_for_function: its string predicates are eval'd in the page, which the page's CSP refuses)
    page.wait_for_selector(f"#results details[data-turn='{n}'], #error:not([hidden])", timeout=20_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()


def _column(page, turn, kind):
    """What the page shows in turn ``turn``'s column ``kind``: its stats and its hits."""
    return page.evaluate("""([turn, kind]) => {
        const col = document.querySelector(`details[data-turn="${turn}"] [data-column="${kind}"]`);
        const stats = {};
        for (const s of col.querySelectorAll('[data-stat]')) {
            stats[s.dataset.stat] = s.querySelector('.value').textContent;
        }
        const hits = [...col.querySelectorAll('li.hit')].map(li => ({
            id: li.dataset.id, score: li.querySelector('.score').textContent,
            text: li.querySelector('.passage').textContent,
            title: li.querySelector('.title') ? li.querySelector('.title').textContent : '',
            rel: li.dataset.rel === undefined ? null : Number(li.dataset.rel),
            badge: li.querySelector('.rel') ? li.querySelector('.rel').textContent : null}));
        const judged = col.querySelector('.judged');
        return {stats, hits, judged: judged ? judged.textContent : null};
    }""", [turn, kind])


def _api_hits(url, turns, top_k):
    r = httpx.post(url + "/v1/search", json={"turns": turns, "top_k": top_k}, timeout=30)
    assert r.status_code == 200, r.text
    return [(h["id"], f"{h['score']:.4f}") for h in r.json()["results"]]


def test_two_typed_turns_in_a_browser_cache_reuse_and_text_never_parsed_as_html(servers, browser):
    url = servers["open"]
    page, messages = _open(browser, url)
    assert page.locator("#key-form").is_hidden()  # no key configured: none asked
    page.wait_for_selector("#eval-form:not([hidden])")
    top_k = 40  # every passage of the tiny collection: the one holding markup is among them
    page.fill("#top-k", str(top_k))
    first = ["w1 w2 w3 <img src=x onerror=\"window.__pwned='utterance'\">"]
    _send(page, first[0])
    _send(page, "w7 w8 w9 w10", reply="w4 w5 w6")
    session1, session2 = _column(page, 1, "session"), _column(page, 2, "session")
    alone2 = _column(page, 2, "utterance")

    # the cache: a miss at turn 1, the first turn's tokens reused at turn 2; the utterance alone is never cached
    assert session1["stats"]["cache"] == "miss" and int(session1["stats"]["reused"]) == 0
    assert session2["stats"]["cache"] == "hit" and int(session2["stats"]["reused"]) > 0
    assert int(session2["stats"]["reused"]) + int(session2["stats"]["computed"]) == int(session2["stats"]["total"])
    assert alone2["stats"]["cache"] == "none" and alone2["stats"]["latency"].endswith(" ms")
    # the results change with the turn, and are what the API answers for the same sessions
    assert [(h["id"], h["score"]) for h in session1["hits"]] != [(h["id"], h["score"]) for h in session2["hits"]]
    session = [{"role": "user", "text": first[0]}, {"role": "assistant", "text": "w4 w5 w6"},
               {"role": "user", "text": "w7 w8 w9 w10"}]
    assert [(h["id"], h["score"]) for h in session2["hits"]] == _api_hits(url, session, top_k)
    assert [(h["id"], h["score"]) for h in alone2["hits"]] == _api_hits(url, session[-1:], top_k)
    assert page.locator("#turns li").count() == 3

    # markup in a passage and in an utterance is shown as text, and nothing of it ran
    xss = [h for h in session2["hits"] if h["id"] == "xss"]
    assert xss and xss[0]["text"] == XSS_TEXT and xss[0]["title"] == XSS_PASSAGE["title"]
    assert first[0] in page.locator("#turns").text_content()
    assert page.evaluate("document.querySelectorAll('#results img, #results script, #results b, #turns img')"
                         ".length") == 0
    page.hover("li.hit[data-id='xss'] .title")
    assert page.evaluate("window.__pwned") is None
    assert not [m for m in messages if "Content Security Policy" in m or m.startswith("pageerror")], messages


def test_an_evaluation_session_replayed_with_its_judged_relevance(servers, browser, world, tmp_path):
    from playwright.sync_api import expect

    qrels = _data.load_qrels(world["qrels"])
    page, messages = _open(browser, servers["open"])
    page.wait_for_selector("#eval-form:not([hidden])")
    page.fill("#top-k", "40")
    page.select_option("#eval-session", "1")
    page.click("#load-session")
    expect(page.locator("#eval-status")).to_have_text("turn 0 of 3")
    for n in (1, 2):
        page.click("#next-turn")
        _wait_turn(page, n)
    for n, qid in ((1, "1_1"), (2, "1_2")):
        assert page.locator(f"details[data-turn='{n}'] .qid").text_content() == f"query {qid}"
        for kind in ("session", "utterance"):
            column = _column(page, n, kind)
            for hit in column["hits"]:  # every passage marked with its judged relevance, the rest "not judged"
                assert hit["rel"] == qrels[qid].get(hit["id"]), (qid, hit)
                assert hit["badge"] == (f"rel {qrels[qid][hit['id']]}" if hit["id"] in qrels[qid] else "not judged")
            relevant = sum(1 for r in qrels[qid].values() if r > 0)
            assert column["judged"] == f"{relevant} of {relevant} relevant passages in the top {len(column['hits'])}"
    assert int(_column(page, 2, "session")["stats"]["reused"]) > 0
    assert page.locator("#eval-status").text_content() == "turn 2 of 3"
    assert page.locator("#turns li").count() == 3  # turn 2's session: query, response, query
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CONVRET_PAGE_SCREENSHOT"):  # where to keep a copy (docs/serve_page.png is made so)
        shutil.copyfile(shot, os.environ["CONVRET_PAGE_SCREENSHOT"])
    assert not [m for m in messages if "Content Security Policy" in m or m.startswith("pageerror")], messages


def test_with_an_api_key_the_page_shows_the_401_then_works_with_the_key(servers, browser):
    from playwright.sync_api import expect

    page, _ = _open(browser, servers["keyed"])
    assert page.locator("#key-form").is_visible() and page.locator("#eval-form").is_hidden()
    page.fill("#utterance", "w1 w2")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    error = page.locator("#error").text_content()
    assert "HTTP 401" in error and "missing or wrong API key" in error
    assert page.locator("#results details").count() == 0
    page.fill("#key", "wrong-key-0123456789")
    page.click("#key-form button")
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    page.fill("#key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#eval-form:not([hidden])")
    assert page.locator("#error").is_hidden()
    _send(page, "w1 w2")
    assert _column(page, 1, "session")["hits"]
