"""``convret generate``: responses from the retriever itself (UniConv), with ROUGE-L and token F1.

A response trained under the session mask sees only the t summary tokens (and earlier response tokens), never
the session text. So after the prefill of ``[session (+ retrieved passages), EMB_1..EMB_t]`` the session's own
keys and values are dropped from the KV cache: decoding keeps t + (response so far) entries per layer, whatever
the session's length. The result is exactly greedy decoding under the dense session mask (tested).

A response is trained as the formatter renders it: the chat template's wrapper around the text (e.g.
``<|im_start|>assistant\n`` ... ``<|im_end|>\n``, Llama-3's header ... ``<|eot_id|>``). The wrapper's start is
given after the summary tokens (as ``add_generation_prompt`` gives it), not generated; decoding stops at an end
of turn or at the wrapper's end, which is removed: the answer is the text alone (:func:`response_text`).
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import statistics
import sys
from collections import Counter
from typing import Any, Sequence

import torch

from .._args import parse
from .._io import atomic_write
from ..provenance import check_output
from . import _data

__all__ = ["generate_response", "response_text", "token_f1", "main"]


@torch.no_grad()
def generate_response(model: torch.nn.Module, prefix: Sequence[int], summary: Sequence[int],
                      max_new_tokens: int = 64, eos_token_ids: Sequence[int] = (), forced: Sequence[int] = (),
                      stop_sequence: Sequence[int] = ()) -> list[int]:
    """Greedy response tokens after ``prefix + summary + forced``, with the prefix's KV entries dropped after the
    prefill (the response attends to the summary tokens and itself only).

    Args:
        forced: the start of the response (the chat template's wrapper), given rather than generated; part of
            the response segment, so it sees the summary tokens only. Not returned.
        eos_token_ids: tokens that end the response (not returned).
        stop_sequence: ids that end the response once generated (returned: :func:`response_text` removes them).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    tokens = list(prefix) + list(summary)
    t = len(summary)
    cache = DynamicCache()
    ids = torch.tensor([tokens], device=device)
    # transformers >= 5.24 names the cache keyword and output field `cache` (`past_key_values`, deprecated there,
    # goes in 5.40); 5.13 .. 5.23 know only `past_key_values`. tests/test_retrieval_generate.py runs on both.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes it on
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    out = model(input_ids=ids, position_ids=torch.arange(len(tokens), device=device)[None], use_cache=True,
                logits_to_keep=1, **{key: cache})
    cache = out[key]
    for layer in cache.layers:  # keep only the summary tokens' keys / values
        layer.keys = layer.keys[:, :, -t:].contiguous()
        layer.values = layer.values[:, :, -t:].contiguous()
    position = len(tokens)
    if forced:  # after the drop: the given start sees the summary tokens and itself only
        out = model(input_ids=torch.tensor([list(forced)], device=device),
                    position_ids=torch.arange(position, position + len(forced), device=device)[None],
                    use_cache=True, logits_to_keep=1, **{key: cache})
        cache = out[key]
        position += len(forced)
    generated: list[int] = []
    stop = set(int(i) for i in eos_token_ids)
    stop_sequence = list(stop_sequence)
    next_id = int(out.logits[0, -1].argmax())
    while True:
        if next_id in stop or len(generated) >= max_new_tokens:
            break
        generated.append(next_id)
        if stop_sequence and generated[-len(stop_sequence):] == stop_sequence:
            break
        out = model(input_ids=torch.tensor([[next_id]], device=device),
                    position_ids=torch.tensor([[position]], device=device), use_cache=True, **{key: cache})
        cache = out[key]
        position += 1
        next_id = int(out.logits[0, -1].argmax())
    return generated


def response_text(tokenizer: Any, ids: Sequence[int], wrapper: tuple[Sequence[int], Sequence[int]],
                  eos_token_ids: Sequence[int] = ()) -> str:
    """The answer in response tokens: the formatter's wrapper (``(start ids, end ids)``, see
    :func:`convret.retrieval._data.text_wrapping`) removed exactly, the text up to an end of turn decoded."""
    ids, start, end = list(ids), list(wrapper[0]), list(wrapper[1])
    if start and ids[: len(start)] == start:
        ids = ids[len(start):]
    if end and ids[-len(end):] == end:
        ids = ids[: -len(end)]
    stops = [k for k, i in enumerate(ids) if i in set(eos_token_ids)]
    if stops:
        ids = ids[: stops[0]]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 (lower-cased, punctuation stripped, whitespace tokens)."""
    def norm(text: str) -> list[str]:
        return re.sub(r"[^\w\s]", " ", text.lower()).split()

    pred, ref = norm(prediction), norm(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(not pred and not ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _passages_for(run_path: str | None, collection: str | None, k: int, fmt: str = "auto"
                  ) -> dict[str, list[Any]]:
    if not run_path:
        return {}
    if not collection:
        raise ValueError("--run needs --collection (the passages' texts)")
    run = _data.load_run(run_path)
    wanted = {q: [d for d, _ in sorted(docs.items(), key=lambda x: (-x[1], x[0]))[:k]] for q, docs in run.items()}
    needed = {d for docs in wanted.values() for d in docs}
    texts = {p.id: p for p in _data.iter_collection(collection, fmt) if p.id in needed}
    missing = needed - set(texts)
    if missing:
        raise ValueError(f"{run_path}: run names passages missing from {collection}, e.g. {sorted(missing)[:3]}")
    return {q: [texts[d] for d in docs] for q, docs in wanted.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret generate",
        description="Generate a response for every evaluation turn with the retriever's own LM head (UniConv), "
                    "optionally conditioned on its top-K retrieved passages; greedy; the session's KV cache is "
                    "dropped after the prefill (the response sees the summary tokens only); the chat template's "
                    "response wrapper is given, not generated, and removed from the answer. Writes jsonl "
                    "{qid, response, reference, rougeL, f1}; prints mean ROUGE-L and token F1.")
    p.add_argument("--model", required=True)
    p.add_argument("--conversations", required=True)
    p.add_argument("--run", default=None, help="TREC run of the same turns (convret search)")
    p.add_argument("--collection", default=None, help="the passages of --run")
    p.add_argument("--passages", type=int, default=3, help="top-K passages of --run put before the summary tokens")
    from ..data.readers import COLLECTION_FORMATS, CONVERSATION_FORMATS

    p.add_argument("--format", default="auto", choices=["auto", *CONVERSATION_FORMATS], metavar="FORMAT",
                   help=f"format of --conversations (default: auto; {', '.join(CONVERSATION_FORMATS)})")
    p.add_argument("--collection-format", default="auto", choices=["auto", *COLLECTION_FORMATS], metavar="FORMAT",
                   help=f"format of --collection (default: auto; {', '.join(COLLECTION_FORMATS)})")
    p.add_argument("--output", required=True, help="jsonl file to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (never replaced without it: a jsonl file does not record "
                        "which model wrote it)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the checkpoint's max_response_len less the response wrapper's start")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype to run the model in (default: the saved dtype)")
    return p


def main(argv: list[str]) -> int:
    from rouge_score import rouge_scorer

    from .encoder import Encoder

    args = parse(build_parser(), argv)
    try:
        check_output(args.output, {}, None, args.overwrite, "responses",
                     "pass --overwrite to replace it, or another --output")
        _data.check_input(args.conversations, args.format, "conversations")
        if args.collection:
            _data.check_input(args.collection, args.collection_format, "collection")
        passages = _passages_for(args.run, args.collection, args.passages, args.collection_format)
        encoder = Encoder.from_checkpoint(args.model, device=args.device, dtype=args.model_dtype)
        tokenizer, config, formatter = encoder.tokenizer, encoder.config, encoder.formatter
        wrapper = _data.text_wrapping(tokenizer, formatter.response)
        start, end = wrapper
        # an end of turn: the tokenizer's EOS, ChatML's <|im_end|>, the wrapper's end when it opens with a special
        # token (<|eot_id|>, </s>); a wrapper's end that opens with plain text stops as a whole sequence
        special = set(tokenizer.all_special_ids)
        candidates = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        if end and end[0] in special:
            candidates.add(end[0])
        eos = [i for i in candidates if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]
        budget = args.max_new_tokens or max(1, (config.max_response_len or 128) - len(start))
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        rows = []
        for turn in _data.iter_conversations(args.conversations, args.format):
            prefix = list(formatter.session_with_passages(turn.history, turn.query, passages.get(turn.qid, [])))
            ids = generate_response(encoder.model, prefix, config.summary_block(), budget, eos, forced=start,
                                    stop_sequence=end)
            response = response_text(tokenizer, start + ids, wrapper, eos)
            row = {"qid": turn.qid, "response": response, "reference": turn.response}
            if turn.response:
                row["rougeL"] = scorer.score(turn.response, response)["rougeL"].fmeasure
                row["f1"] = token_f1(response, turn.response)
            rows.append(row)
        with atomic_write(args.output) as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    except (ValueError, OSError) as error:
        print(f"convret generate: error: {error}", file=sys.stderr)
        return 1
    scored = [r for r in rows if "rougeL" in r]
    if scored:
        print(f"ROUGE-L {statistics.fmean(r['rougeL'] for r in scored):.4f}  token F1 "
              f"{statistics.fmean(r['f1'] for r in scored):.4f}  ({len(scored)} turns with a reference)")
    print(f"{len(rows)} responses written to {args.output}", file=sys.stderr)
    return 0
