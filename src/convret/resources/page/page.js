// The exploration page of `convret serve`: a client of the JSON API, nothing more.
// Every text that comes from a request or an answer is put into the page as text (textContent, or a string
// given to Node.append, which makes a text node); nothing is ever parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const authRequired = document.querySelector('meta[name="convret-auth"]').content === "required";
  const state = {
    conversationId: "",
    turns: [],        // the session so far: [{role, text}]
    turnNumber: 0,
    evalTurns: null,  // the loaded evaluation conversation's turns, or null
    evalIndex: 0,
    qrels: false,     // whether the server has qrels
    busy: false,
  };

  // ------------------------------------------------------------------------------------------ the DOM
  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    const parts = children.filter((c) => c !== null && c !== undefined);
    node.append(...parts.map((c) => (typeof c === "number" ? String(c) : c)));  // strings become text nodes
    return node;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  // ------------------------------------------------------------------------------------------ the API
  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function detailText(body) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
    return "no detail";
  }

  async function api(path, body) {
    const options = body === undefined ? { headers: headers(false) }
      : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
    const started = performance.now();
    const response = await fetch(path, options);
    const elapsed = performance.now() - started;
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      throw new Error(`${path.split("?")[0]}: HTTP ${response.status}: ${detailText(data)}` +
                      (retry ? ` (retry after ${retry} s)` : ""));
    }
    return { data, elapsed };
  }

  // ------------------------------------------------------------------------------------------ conversation
  function newConversationId() {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function resetConversation() {
    state.conversationId = newConversationId();
    state.turns = [];
    state.turnNumber = 0;
    $("conversation-id").textContent = state.conversationId;
    $("results").replaceChildren();
    renderTurns();
  }

  function renderTurns() {
    $("turns").replaceChildren(...state.turns.map((t) => el("li", "turn " + (t.role === "user" ? "user" : "assistant"),
      el("span", "role", t.role), el("span", "text", t.text))));
  }

  function topK() {
    const k = parseInt($("top-k").value, 10);
    return Number.isFinite(k) && k > 0 ? k : 10;
  }

  // One turn: the whole session (under the conversation id, so the server reuses its cached session) beside the
  // current utterance alone (a one-turn session, no conversation id).
  async function runTurn(session, qid) {
    const k = topK();
    const whole = await api("v1/search", { conversation_id: state.conversationId, turns: session, top_k: k });
    const alone = await api("v1/search", { turns: [session[session.length - 1]], top_k: k });
    let judgments = null;
    if (qid && state.qrels) judgments = (await api("v1/qrels?qid=" + encodeURIComponent(qid))).data.judgments;
    state.turnNumber += 1;
    renderResult(state.turnNumber, qid, session[session.length - 1].text, whole, alone, judgments);
  }

  async function guarded(work) {
    if (state.busy) return;
    state.busy = true;
    document.body.classList.add("busy");
    clearError();
    try {
      await work();
    } catch (error) {
      showError(error.message);
    } finally {
      state.busy = false;
      document.body.classList.remove("busy");
    }
  }

  // ------------------------------------------------------------------------------------------ results
  function relevanceOf(judgments, id) {
    if (!judgments) return null;
    return Object.prototype.hasOwnProperty.call(judgments, id) ? judgments[id] : undefined;
  }

  function hitItem(hit, rank, judgments) {
    const rel = relevanceOf(judgments, hit.id);
    let badge = null;
    let cls = "hit";
    if (rel !== null) {
      if (rel === undefined) {
        badge = el("span", "rel unjudged", "not judged");
        cls += " unjudged";
      } else {
        badge = el("span", "rel " + (rel > 0 ? "relevant" : "nonrelevant"), "rel " + rel);
        cls += rel > 0 ? " relevant" : " nonrelevant";
      }
    }
    const item = el("li", cls,
      el("div", "hit-head", el("span", "rank", "#" + rank), el("span", "pid", hit.id),
         el("span", "score", hit.score.toFixed(4)), badge),
      hit.title ? el("div", "title", hit.title) : null,
      el("div", "passage", hit.text));
    item.dataset.id = hit.id;
    if (rel !== null && rel !== undefined) item.dataset.rel = String(rel);
    return item;
  }

  function stat(name, label, value) {
    const item = el("span", "stat", el("span", "label", label), el("span", "value", value));
    item.dataset.stat = name;
    return item;
  }

  function column(kind, heading, answer, judgments) {
    const enc = answer.data.encoding;
    const hits = answer.data.results;
    const stats = el("div", "stats",
      stat("cache", "cache", enc.cache),
      stat("reused", "reused", enc.reused_tokens),
      stat("computed", "computed", enc.computed_tokens),
      stat("total", "tokens", enc.total_tokens),
      stat("latency", "round trip", answer.elapsed.toFixed(1) + " ms"));
    let summary = null;
    if (judgments) {
      const relevant = Object.values(judgments).filter((r) => r > 0).length;
      const found = hits.filter((h) => (judgments[h.id] || 0) > 0).length;
      summary = el("div", found ? "judged" : "judged none",
                   `${found} of ${relevant} relevant passages in the top ${hits.length}`);
    }
    const list = el("ol", "hits", ...hits.map((h, i) => hitItem(h, i + 1, judgments)));
    const col = el("div", "column " + kind, el("h3", null, heading), stats, summary, list);
    col.dataset.column = kind;
    return col;
  }

  function renderResult(number, qid, utterance, whole, alone, judgments) {
    for (const older of $("results").querySelectorAll("details")) older.open = false;
    const title = el("summary", null, el("span", "turn-number", "Turn " + number),
      qid ? el("span", "qid", "query " + qid) : null, el("span", "utterance", utterance));
    const block = el("details", "result", title,
      el("div", "columns",
         column("session", "Whole session", whole, judgments),
         column("utterance", "Current utterance alone", alone, judgments)));
    block.open = true;
    block.dataset.turn = String(number);
    $("results").prepend(block);
  }

  // ------------------------------------------------------------------------------------------ evaluation sessions
  async function loadSessions() {
    const { data } = await api("v1/eval/sessions");
    state.qrels = data.qrels;
    if (!data.loaded) return;
    $("eval-session").replaceChildren(...data.sessions.map((s) => {
      const option = el("option", null, `${s.conv_id} (${s.turns} turns): ${s.first_query}`);
      option.value = s.conv_id;
      return option;
    }));
    $("eval-form").hidden = false;
  }

  function evalStatus() {
    const n = state.evalTurns ? state.evalTurns.length : 0;
    $("eval-status").textContent = state.evalTurns ? `turn ${state.evalIndex} of ${n}` : "";
    $("next-turn").disabled = !state.evalTurns || state.evalIndex >= n;
  }

  async function loadSession() {
    const conv = $("eval-session").value;
    const { data } = await api("v1/eval/session?conv_id=" + encodeURIComponent(conv));
    resetConversation();
    state.evalTurns = data.turns;
    state.evalIndex = 0;
    evalStatus();
  }

  async function nextTurn() {
    const turn = state.evalTurns[state.evalIndex];
    const session = [...turn.history, { role: "user", text: turn.query }];
    await runTurn(session, turn.qid);
    state.evalIndex += 1;
    state.turns = session;
    renderTurns();
    evalStatus();
  }

  async function typedTurn() {
    const utterance = $("utterance").value;
    const reply = $("assistant").value;
    if (!utterance.trim()) throw new Error("type an utterance first");
    const session = [...state.turns];
    if (reply.trim()) session.push({ role: "assistant", text: reply });
    session.push({ role: "user", text: utterance });
    await runTurn(session, null);
    state.turns = session;
    state.evalTurns = null;  // the conversation has left the evaluation file
    evalStatus();
    renderTurns();
    $("utterance").value = "";
    $("assistant").value = "";
  }

  // ------------------------------------------------------------------------------------------ wiring
  function start() {
    resetConversation();
    $("turn-form").addEventListener("submit", (e) => { e.preventDefault(); guarded(typedTurn); });
    $("eval-form").addEventListener("submit", (e) => { e.preventDefault(); guarded(loadSession); });
    $("next-turn").addEventListener("click", () => guarded(nextTurn));
    $("new-conversation").addEventListener("click", () => {
      clearError();
      resetConversation();
      state.evalTurns = null;
      evalStatus();
    });
    $("key-form").addEventListener("submit", (e) => { e.preventDefault(); guarded(loadSessions); });
    if (authRequired) {
      $("key-form").hidden = false;
    } else {
      guarded(loadSessions);
    }
    document.body.dataset.ready = "1";
  }

  start();
})();
