"""Parsers of the field's evaluation-conversation formats beyond ChatRetriever / QReCC / CAsT 2019-21: TREC iKAT
2023-25 topics, TREC CAsT 2022 (tree and flattened), ConvDR / COTED and T5QR / ConvGQR jsonl, SCAI-QReCC, BEIR /
mt-rag queries and ``qid<TAB>text`` queries. Each turns one record into evaluation turns (:class:`EvalTurn`)
whose qid is the id the set's own qrels use; :func:`convret.data.readers.read_conversations` drives them
(docs/data.md has the formats)."""
from __future__ import annotations

import re
from typing import Any, Callable

from ._parsing import _Bad, _context_turns, _field, _ident, _str_list, _text, _unique_turns
from .records import ASSISTANT, USER, EvalTurn, Turn


def _ikat_ptkb(obj: Any) -> list[str]:
    ptkb = obj.get("ptkb")
    if ptkb is None:
        return []
    if isinstance(ptkb, dict):  # 2023 / 2024: {"1": statement, ...}, in the order of the statement numbers
        keys = sorted(ptkb, key=lambda k: (0, int(k), "") if str(k).strip().isdigit() else (1, 0, str(k)))
        items = [(f"ptkb[{k!r}]", ptkb[k]) for k in keys]
    elif isinstance(ptkb, list):  # 2025: a list
        items = [(f"ptkb[{j}]", value) for j, value in enumerate(ptkb)]
    else:
        raise _Bad(f"field 'ptkb' must be an object or a list, got {type(ptkb).__name__}")
    for where, value in items:
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"{where} must be a non-empty str")
    return [value for _, value in items]


def _parse_ikat(obj: Any) -> list[EvalTurn]:
    """TREC iKAT topics: 2023 / 2024 ``turns`` of ``utterance``, 2025 ``responses`` of ``user_utterance``."""
    conv_id = _ident(obj, "number")
    key, utterance_key = ("responses", "user_utterance") if "responses" in obj else ("turns", "utterance")
    turns = _field(obj, key, list)
    if not turns:
        raise _Bad(f"empty {key!r}")
    ptkb = _ikat_ptkb(obj)
    out: list[EvalTurn] = []
    history: list[Turn] = []
    for where, turn, turn_id in _unique_turns(turns, key):
        utterance = _text(turn, utterance_key, where)
        response = _text(turn, "response", where, optional=True)
        out.append(EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, list(history), utterance,
                            _text(turn, "resolved_utterance", where, optional=True), response, [], ptkb=list(ptkb)))
        history.append(Turn(USER, utterance))
        if response is not None:
            history.append(Turn(ASSISTANT, response))
    return out


def _parse_cast2022_tree(obj: Any) -> list[EvalTurn]:
    """CAsT 2022 tree topics: every turn names its ``parent``; a User turn's session is its ancestors."""
    conv_id = _ident(obj, "number")
    turns = _field(obj, "turn", list)
    if not turns:
        raise _Bad("empty 'turn'")
    nodes: dict[str, tuple[str, str, str | None, Any, str]] = {}
    for i, turn in enumerate(turns):
        where = f"turn[{i}]"
        number = _ident(turn, "number", where)
        if number in nodes:
            raise _Bad(f"duplicate turn number {number!r} in {where}")
        participant = _field(turn, "participant", str, where).lower()
        if participant == "user":
            role, text = USER, _text(turn, "utterance", where)
        elif participant == "system":
            role, text = ASSISTANT, _text(turn, "response", where)
        else:
            raise _Bad(f"unknown participant {turn['participant']!r} in {where} (expected 'User' or 'System')")
        parent = _field(turn, "parent", (str, int), where, optional=True)
        nodes[number] = (role, text, None if parent is None else str(parent), turn, where)
    answers: dict[str, str] = {}
    for number, (role, text, parent, _, where) in nodes.items():
        if parent is not None and parent not in nodes:
            raise _Bad(f"{where}: parent {parent!r} is not a turn of topic {conv_id}")
        if role == ASSISTANT and parent is not None:
            answers.setdefault(parent, text)
    out: list[EvalTurn] = []
    for number, (role, text, parent, turn, where) in nodes.items():
        if role != USER:
            continue
        chain, visited = [], {number}
        while parent is not None:
            if parent in visited:
                raise _Bad(f"{where}: its parent chain loops at {parent!r}")
            visited.add(parent)
            parent_role, parent_text, parent, _, _ = nodes[parent]
            chain.append(Turn(parent_role, parent_text))
        chain.reverse()
        out.append(EvalTurn(f"{conv_id}_{number}", conv_id, number, chain, text,
                            _text(turn, "manual_rewritten_utterance", where, optional=True), answers.get(number), []))
    if not out:
        raise _Bad("no User turn in 'turn'")
    return out


def _cast2022_flat_parser() -> Callable[[Any], list[EvalTurn]]:
    """CAsT 2022 flattened topics: one record per path of the tree, so a turn shared by several paths comes once
    per path (with the same session); each qid is yielded once, from the first path that holds it."""
    yielded: set[str] = set()

    def parse(obj: Any) -> list[EvalTurn]:
        conv_id = _ident(obj, "number")
        turns = _field(obj, "turn", list)
        if not turns:
            raise _Bad("empty 'turn'")
        out: list[EvalTurn] = []
        history: list[Turn] = []
        seen = set()
        for i, turn in enumerate(turns):
            where = f"turn[{i}]"
            number = _ident(turn, "number", where)
            if isinstance(turn, dict) and "participant" in turn:
                raise _Bad(f"{where} has a 'participant': this is a CAsT 2022 tree file (format 'cast2022')")
            if number in seen:
                raise _Bad(f"duplicate turn number {number!r} in {where}")
            seen.add(number)
            utterance = _text(turn, "utterance", where)
            response = _text(turn, "response", where, optional=True)
            qid = f"{conv_id}_{number}"
            if qid not in yielded:
                out.append(EvalTurn(qid, conv_id, number, list(history), utterance,
                                    _text(turn, "manual_rewritten_utterance", where, optional=True), response, []))
            history.append(Turn(USER, utterance))
            if response is not None:
                history.append(Turn(ASSISTANT, response))
        yielded.update(turn.qid for turn in out)
        return out

    return parse


def _split_turn_id(text: str, what: str) -> tuple[str, str]:
    conv_id, sep, turn_id = text.rpartition("_")
    if not sep or not conv_id or not turn_id:
        raise _Bad(f"{what} {text!r} is not '{{conversation}}_{{turn}}'")
    return conv_id, turn_id


def _parse_convdr(obj: Any) -> list[EvalTurn]:
    """ConvDR / COTED eval jsonl: ``turn_id`` is the qrels' qid; history = ``context_qs`` (+ the previous turn's
    ``last_manual_response``, CAsT-20)."""
    qid = _ident(obj, "turn_id")
    query = _text(obj, "query")
    conv_id, turn_id = obj.get("topic_number"), obj.get("query_number")
    if conv_id is None or turn_id is None:
        conv_id, turn_id = _split_turn_id(qid, "turn_id")
    else:
        conv_id, turn_id = _ident(obj, "topic_number"), _ident(obj, "query_number")
    history = [Turn(USER, text) for text in _str_list(obj, "context_qs")]
    last_response = _text(obj, "last_manual_response", optional=True)
    if last_response is not None and history:
        history.append(Turn(ASSISTANT, last_response))
    return [EvalTurn(qid, conv_id, turn_id, history, query, _text(obj, "oracle_query", optional=True), None, [])]


def _parse_t5qr(obj: Any) -> list[EvalTurn]:
    """T5QR / ConvGQR jsonl: ``sample_id`` ``{set}_{conv}_{turn}`` (``CAsT20-test_81_1``); the qid drops the set
    prefix (``81_1``, as the set's qrels spell it)."""
    sample_id = _ident(obj, "sample_id")
    parts = sample_id.rsplit("_", 2)
    if len(parts) < 2 or not all(parts):
        raise _Bad(f"sample_id {sample_id!r} is not '{{set}}_{{conversation}}_{{turn}}'")
    conv_id, turn_id = parts[-2], parts[-1]
    query = _text(obj, "cur_utt_text")
    utterances = _str_list(obj, "ctx_utts_text")
    responses = _str_list(obj, "ctx_resps_text", allow_empty=True)
    # responses pair with the latest utterances (T5QR writes [""] for a first turn; some files keep the last only)
    extra = len(responses) - len(utterances)
    if extra > 0:
        if any(r.strip() for r in responses[:extra]):
            raise _Bad(f"{len(responses)} ctx_resps_text for {len(utterances)} ctx_utts_text")
        responses = responses[extra:]
    offset = len(utterances) - len(responses)
    history: list[Turn] = []
    for j, utterance in enumerate(utterances):
        history.append(Turn(USER, utterance))
        if j >= offset and responses[j - offset].strip():
            history.append(Turn(ASSISTANT, responses[j - offset]))
    return [EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, history, query,
                     _text(obj, "oracle_utt_text", optional=True), None, [])]


def _parse_scai_qrecc(obj: Any) -> list[EvalTurn]:
    """SCAI-QReCC: ``Truth_rewrite``, ``Truth_answer``, ``Truth_passages`` (ids ``{URL}_p{N}``). Its ground-truth file
    has no question: the query is then the rewrite, with ``Question`` / ``Context`` used when present."""
    conv_id, turn_id = _ident(obj, "Conversation_no"), _ident(obj, "Turn_no")
    rewrite = _text(obj, "Truth_rewrite")
    question = _text(obj, "Question", optional=True)
    return [EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, _context_turns(obj), question or rewrite, rewrite,
                     _text(obj, "Truth_answer", optional=True), [],
                     positive_ids=list(_str_list(obj, "Truth_passages")))]


_MTRAG_SPEAKER = re.compile(r"\|(user|agent|assistant)\|: ?")


def _mtrag_turns(text: str) -> list[Turn] | None:
    """mt-rag's query text ``|user|: q1\n|user|: q2`` as turns (a line without a speaker continues the turn before);
    ``None`` when the text does not start with a speaker."""
    turns: list[list[str]] = []
    for line in text.split("\n"):
        match = _MTRAG_SPEAKER.match(line)
        if match:
            turns.append([USER if match.group(1) == "user" else ASSISTANT, line[match.end():]])
        elif turns:
            turns[-1][1] += "\n" + line
        else:
            return None
    return [Turn(role, body) for role, body in turns]


def _parse_query_tsv(line: str) -> list[EvalTurn]:
    """``qid<TAB>text``: a single-turn query (no history); ``{conv}_{turn}`` qids are split into their parts."""
    qid, sep, text = line.partition("\t")
    qid = qid.strip()
    if not sep:
        raise _Bad("expected 'qid<TAB>text'")
    if not qid:
        raise _Bad("empty qid")
    if not text.strip():
        raise _Bad("empty text")
    conv_id, sep, turn_id = qid.rpartition("_")
    if not sep or not conv_id or not turn_id:
        conv_id, turn_id = qid, ""
    return [EvalTurn(qid, conv_id, turn_id, [], text.strip())]


def _parse_beir_query(obj: Any) -> list[EvalTurn]:
    """BEIR queries ``{"_id", "text"}``: the qid is ``_id`` as is (mt-rag's ``{conversation}<::>{turn}`` too); an
    mt-rag text of ``|user|: ...`` lines is split into a session."""
    qid = _ident(obj, "_id")
    text = _text(obj, "text")
    conv_id, sep, turn_id = qid.rpartition("<::>")
    if not sep:
        conv_id, turn_id = qid, ""
    turns = _mtrag_turns(text)
    if turns is None:
        return [EvalTurn(qid, conv_id, turn_id, [], text)]
    if turns[-1].role != USER or not turns[-1].text.strip():
        raise _Bad("the last '|speaker|:' turn of 'text' is not a non-empty '|user|:' turn")
    if any(not turn.text.strip() for turn in turns):
        raise _Bad("an empty '|speaker|:' turn in 'text'")
    return [EvalTurn(qid, conv_id, turn_id, turns[:-1], turns[-1].text)]
