"""``convret export``: a sentence-transformers model directory from a convret checkpoint.

``SentenceTransformer(OUT)`` loads it and encodes to the same vectors as ``convret encode``:

- ``modules.json``: Transformer, ``1_Pooling`` (``pooling_mode_lasttoken``: the last summary token),
  ``2_Normalize`` when the model was trained on normalised embeddings (without ``modules.json``
  sentence-transformers would silently mean-pool);
- the tokenizer's post-processor appends what follows a text in training (the end of its message) and the
  summary tokens, so the input ids equal convret's formatter's;
- ``config_sentence_transformers.json``: prompt ``"document"`` (the default: ``encode`` / ``encode_document``) =
  what the formatter writes before a passage's text (BOS, the assistant message's start, the passage
  instruction), prompt ``"query"`` (``encode_query``) = what it writes before the query of a session without
  history (BOS, the instruction, the user message's start); both prompts are derived from the formatter's own
  renderings (:func:`text_prompt`), so they follow whatever it does. A prompt is text that sentence-transformers
  puts in front of the input and tokenizes together with it: where the template's role markers are plain text
  (Mistral v0.1 / v0.2, Llama-2-chat: ``[INST] ... [/INST]``) or an instruction shares the query's message, the
  input is tokenized with the text around it exactly as convret tokenizes the rendered conversation;
- lengths: the tokenizer's ``model_max_length`` and ``document_length`` = ``max_passage_len`` (+ the summary
  tokens), ``query_length`` = ``max_session_len`` (+ the summary tokens): a passage is cut exactly where
  ``convret encode`` cuts it (its first tokens are kept);
- a session with history: ``encode_query(session_text(...))``: the formatted session (convret's truncation:
  whole oldest turns dropped) without what the prompt and the tokenizer add. A lone query longer than
  ``max_session_len`` is where the two differ: sentence-transformers keeps its first tokens, convret its last;
- merged (``--merge``, or a fully fine-tuned checkpoint): the whole model in OUT; otherwise the LoRA adapter in
  OUT over the base model in ``OUT/base`` (its absolute path is written into ``adapter_config.json``: move the
  directory and re-export, or use ``--merge``).

Sessions and passages that end differently (Mistral's ``[/INST]`` vs ``</s>``, or ``summary_on_passages:
false``: sessions end with the summary tokens, passages do not) need a tokenizer per task: the export is then a
sentence-transformers ``Router`` with a Transformer per task (``query_0_Transformer``, ``document_0_Transformer``,
the merged weights written in each: ``--merge`` is required). A template under which no prompt followed by the
query gives convret's tokens (one that rewrites the query's text) exports the passages alone: a ``Router`` with
the ``document`` route only, so that ``encode_query`` raises rather than embed sessions differently; the reason is
in ``convret_export.json`` and on stderr.

No code travels with the export (no ``trust_remote_code``): every part is a stock sentence-transformers module.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from .._args import parse
from ..data.records import Turn
from ..provenance import check_output, content_identity, read_record
from . import _data

__all__ = ["export_sentence_transformers", "passage_wrapping", "query_wrapping", "query_prompt", "text_prompt",
           "session_text", "main"]


def passage_wrapping(tokenizer: Any, formatter: Any) -> tuple[list[int], list[int]]:
    """``(prefix ids, suffix ids)`` that the formatter puts around a passage's own tokens."""
    return _data.text_wrapping(tokenizer, formatter.passage)


def query_wrapping(tokenizer: Any, formatter: Any) -> tuple[list[int], list[int]]:
    """``(prefix ids, suffix ids)`` that the formatter puts around the query of a session without history (a
    ``ValueError`` when the query's own tokens do not appear intact in it: see :func:`query_prompt`)."""
    return _data.text_wrapping(tokenizer, lambda text: formatter.session([], text))


def _probes(tokenizer: Any) -> list[str]:
    special = set(tokenizer.all_special_ids)
    plain = [i for i in range(min(len(tokenizer), 4096)) if i not in special]
    return [tokenizer.decode(plain[5:8]), "hello world", "x", "Paris is a city", "how tall is it?", "1984 (the year)"]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def text_prompt(tokenizer: Any, render: Callable[[str], Sequence[int]], what: str) -> tuple[str, list[int]]:
    """``(prompt, suffix ids)`` such that ``render(text) == tokens(prompt + text) + suffix`` (``tokens``: the
    tokenizer without added special tokens) for every probe text: sentence-transformers puts a prompt in front of
    the text and tokenizes the two together, and the exported tokenizer appends the suffix.

    Two ways, the first that holds: the text's own tokens appear intact inside the rendering, behind a prefix of
    tokens written as text (:func:`convret.retrieval._data.text_wrapping`); or, where the template's text around
    a message is tokenized together with it (role markers written as plain text, as Mistral v0.1 / v0.2 and
    Llama-2-chat write ``[INST] ... [/INST]``; an instruction merged into the query's message), the rendering's
    text in front of the probe, so that the tokenizer reads prompt and text together exactly as it read the
    rendering.

    Raises:
        ValueError: neither holds for every probe (naming ``what``).
    """
    probes = _probes(tokenizer)
    try:
        prefix, suffix = _data.text_wrapping(tokenizer, render)
    except ValueError:
        pass
    else:
        probe = probes[0]
        decoded = _decode(tokenizer, prefix)
        for prompt in (decoded, decoded + " "):  # decoding may drop the separator a word-level tokenizer needs
            if _tokens(tokenizer, prompt + probe) == prefix + _tokens(tokenizer, probe):
                return prompt, list(suffix)
    rendered = {probe: list(render(probe)) for probe in probes if _tokens(tokenizer, probe)}
    for probe, ids in rendered.items():
        text = _decode(tokenizer, ids)
        at = text.rfind(probe)  # the last occurrence: the message comes last
        if at < 0:
            continue
        prompt = text[:at]
        head = _tokens(tokenizer, prompt + probe)
        if ids[: len(head)] != head:
            continue
        suffix = ids[len(head):]
        if all(other == _tokens(tokenizer, prompt + p) + suffix for p, other in rendered.items()):
            return prompt, suffix
    raise ValueError(f"cannot write the {what} as a sentence-transformers prompt followed by the text: this "
                     "tokenizer and chat template tokenize a text differently with the template's text around it")


def query_prompt(tokenizer: Any, formatter: Any) -> tuple[str, list[int]]:
    """``(prompt, suffix ids)`` of a session without history (:func:`text_prompt`)."""
    return text_prompt(tokenizer, lambda text: formatter.session([], text), "query")


def session_text(tokenizer: Any, config: Any, history: Sequence[Turn], query: str) -> str:
    """The text to give an exported model (``model.encode_query(text)``) for a session: the formatted session,
    truncated as convret truncates it, without what the ``"query"`` prompt puts in front and what the exported
    tokenizer appends.

    Raises:
        ValueError: the exported model would not read this text as convret's tokens (checked for every session:
            a session that does not start as a one-query session does, or a tokenizer that would read the text
            back differently, e.g. a query ending in whitespace before a marker written as text); embed it with
            ``convret encode`` or :class:`convret.retrieval.encoder.Encoder`.
    """
    formatter = _data.formatter_for(tokenizer, config)
    prompt, suffix = query_prompt(tokenizer, formatter)
    ids = list(formatter.session(history, query))
    head = ids[: len(ids) - len(suffix)]
    text = _decode(tokenizer, head)
    if ids[len(head):] != suffix or not text.startswith(prompt) or _tokens(tokenizer, text) != head:
        raise ValueError("this session cannot be written as a text that the exported model reads as convret's "
                         "tokens (it does not start / end as a one-query session does, or the tokenizer reads its "
                         "text back differently); embed it with convret")
    return text[len(prompt):]


def _check_passage_cut(tokenizer: Any, formatter: Any, prompt: str, suffix: list[int]) -> None:
    """A passage longer than ``max_passage_len``: sentence-transformers keeps the first tokens of prompt + text
    that fit in front of the suffix; the formatter must have kept the same."""
    limit = formatter.max_passage_len
    if limit is None:
        return
    text = "Paris is a city"
    while len(_tokens(tokenizer, text)) <= limit:
        text = f"{text} and {text}"
    kept = _tokens(tokenizer, prompt + text)[: max(0, limit - len(suffix))]
    if formatter.passage(text) != kept + suffix:
        raise ValueError("a passage longer than max_passage_len is cut differently from the first tokens of "
                         "prompt + text (the template renders a passage in the context of the text around it)")


def _template_tokenizer(tokenizer: Any, suffix: list[int], summary: list[int]) -> None:
    from tokenizers import processors

    pieces = [(tokenizer.convert_ids_to_tokens(i), i) for i in suffix + summary]
    single = ["$A"] + [name for name, _ in pieces]
    pair = ["$A"] + [name for name, _ in pieces] + ["$B:1"] + [f"{name}:1" for name, _ in pieces]
    specials = list({name: (name, i) for name, i in pieces}.values())
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                               special_tokens=specials)


def _check_adapter_loading(checkpoint: str | os.PathLike) -> None:
    """sentence-transformers loads base + adapter through transformers' PEFT integration, which has a minimum
    peft version: fail before writing anything rather than export a directory that cannot be loaded."""
    from ..train.checkpoint import CONFIG_NAME

    if not json.loads((Path(checkpoint) / CONFIG_NAME).read_text(encoding="utf-8")).get("adapter"):
        return
    import peft
    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return
    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        raise ValueError(f"{checkpoint} is a LoRA checkpoint: sentence-transformers loads base + adapter through "
                         f"transformers' PEFT integration, which needs peft >= {MIN_PEFT_VERSION} (installed "
                         f"{peft.__version__}); upgrade peft, or export a merged model with --merge")


def export_sentence_transformers(checkpoint: str | os.PathLike, output: str | os.PathLike, merge: bool = False,
                                 overwrite: bool = False) -> Path:
    """Write the sentence-transformers directory for ``checkpoint`` to ``output`` (atomically).

    An existing ``output`` exported from the same checkpoint (by content) with the same ``merge`` is replaced;
    another model's export (or a directory that is not an export) is refused naming the difference, unless
    ``overwrite`` (:mod:`convret.provenance`)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    from .._io import atomic_directory
    from ..train.checkpoint import CONFIG_NAME, is_checkpoint, is_peft_model, load_retriever

    if not is_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is not a convret checkpoint (no {CONFIG_NAME}); give convret train's "
                         "OUTPUT_DIR/final")
    fingerprint = {"checkpoint": content_identity(checkpoint), "merged": bool(merge)}
    recorded = (read_record(Path(output) / "convret_export.json") or {}).get("fingerprint")
    check_output(output, fingerprint, recorded, overwrite, "a sentence-transformers export",
                 "pass --overwrite to replace it, or another output directory")
    if not merge:
        _check_adapter_loading(checkpoint)
    loaded = load_retriever(checkpoint, merge=merge, attn_implementation="sdpa")
    model, tokenizer, config = loaded
    formatter = _data.formatter_for(tokenizer, config)
    try:
        document_prompt, suffix = text_prompt(tokenizer, formatter.passage, "passage")
        _check_passage_cut(tokenizer, formatter, document_prompt, suffix)
    except ValueError as error:
        raise ValueError(f"{checkpoint}: {error}; embed with `convret encode`") from error
    prompts = {"document": document_prompt}
    try:
        prompts["query"], query_suffix = query_prompt(tokenizer, formatter)
    except ValueError as error:
        prompts.pop("query", None)
        query_suffix, queries_refused = None, str(error)
    summary = config.summary_block()
    passage_summary = summary if config.summary_on_passages else []
    # sentence-transformers truncates to these (prompt and appended tokens included): a passage keeps its first
    # tokens within max_passage_len as in convret; a session from session_text() is already truncated
    document_length = (config.max_passage_len or tokenizer.model_max_length) + len(passage_summary)
    query_length = (config.max_session_len or tokenizer.model_max_length) + len(summary)
    info = {"checkpoint": str(checkpoint), "merged": True, "passage_prefix": _tokens(tokenizer, document_prompt),
            "fingerprint": fingerprint}
    if query_suffix is None:
        # documents only, behind a Router whose only route is "document": encode_query raises instead of embedding
        # sessions some other way than convret does
        if is_peft_model(model):
            raise ValueError(f"{checkpoint}: only passages can be exported ({queries_refused}): the export is then a "
                             "model with a documents route only; use --merge")
        return _export_routed(model, tokenizer, config, output, prompts,
                              {"document": (suffix + passage_summary, document_length)},
                              {**info, "queries": f"not exported: {queries_refused}; embed sessions with "
                                                  "`convret encode`"})
    info["query_prefix"] = _tokens(tokenizer, prompts["query"])
    if query_suffix != suffix or not config.summary_on_passages:
        if is_peft_model(model):
            raise ValueError(f"{checkpoint}: sessions and passages end differently (a template such as Mistral's, "
                             "or summary_on_passages false): the export needs a model per route; use --merge")
        return _export_routed(model, tokenizer, config, output, prompts,
                              {"query": (query_suffix + summary, query_length),
                               "document": (suffix + passage_summary, document_length)}, info)
    prefix = info["passage_prefix"]
    query_prefix = info["query_prefix"]
    _template_tokenizer(tokenizer, suffix, summary)
    tokenizer.model_max_length = document_length
    # sentence-transformers applies a tokenizer's chat template to plain text itself (as a user message, without
    # the post-processor): the exported tokenizer has none, its template already gives convret's ids
    tokenizer.chat_template = None
    output = Path(output).resolve()
    adapter = is_peft_model(model)
    with atomic_directory(output, overwrite=True) as tmp:
        hf_dir = tmp
        if adapter:
            base_dir = output / "base"  # where it will be after the rename
            base = model.get_base_model()
            import copy

            copy.deepcopy(model).unload().save_pretrained(tmp / "base", safe_serialization=True)
            model.peft_config["default"].base_model_name_or_path = str(tmp / "base")  # final path set below
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            tokenizer.save_pretrained(tmp / "base")
            del base
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        transformer = Transformer(str(hf_dir), max_seq_length=document_length, query_length=query_length,
                                  document_length=document_length, model_kwargs={"attn_implementation": "sdpa"})
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")]
        if config.normalize:
            modules.append(Normalize())
        st = SentenceTransformer(modules=modules, device="cpu",
                                 prompts=prompts,
                                 default_prompt_name="document",
                                 similarity_fn_name="cosine" if config.normalize else "dot")
        with tempfile.TemporaryDirectory(dir=tmp.parent) as staging:
            st.save(staging)
            for entry in Path(staging).iterdir():  # the sentence-transformers files, the weights we wrote stay
                target = tmp / entry.name
                if entry.name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
                                  "README.md") or entry.is_dir():
                    if target.exists() and target.is_dir():
                        shutil.rmtree(target)
                    shutil.move(str(entry), target)
        # transformers' AutoTokenizer rebuilds a Qwen2 / Llama checkpoint's tokenizer from its vocabulary with the
        # model family's own pipeline, which drops the template appending the summary tokens (and mangles a
        # word-level vocabulary): load tokenizer.json as saved, through the plain `tokenizers` backend (any model
        # type registered to it selects it)
        bert_config = json.loads((tmp / "sentence_bert_config.json").read_text(encoding="utf-8"))
        bert_config.setdefault("processor_kwargs", {})["tokenizer_type"] = "gpt_bigcode"
        (tmp / "sentence_bert_config.json").write_text(json.dumps(bert_config, indent=4) + "\n", encoding="utf-8")
        if adapter:
            adapter_config = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = str(base_dir)
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        (tmp / "convret_export.json").write_text(json.dumps(
            {"checkpoint": str(checkpoint), "merged": not adapter, "passage_prefix": prefix,
             "query_prefix": query_prefix, "appended": suffix + summary, "document_length": document_length,
             "query_length": query_length, "fingerprint": fingerprint}, indent=2) + "\n", encoding="utf-8")
    return output


def _export_routed(model: Any, tokenizer: Any, config: Any, output: str | os.PathLike,
                   prompts: dict[str, str], routes: dict[str, tuple[list[int], int]], info: dict[str, Any]) -> Path:
    """A sentence-transformers ``Router`` with a Transformer per task in ``routes`` (``"query"``: ``encode_query``,
    ``"document"``: ``encode_document`` and plain ``encode``), each with its own tokenizer appending its task's
    end and max length: for sessions and passages that end differently, or documents alone (``encode_query`` then
    raises: no route). The weights are written once per route."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.router import Router
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    from .._io import atomic_directory

    tokenizer.chat_template = None
    output = Path(output).resolve()
    with atomic_directory(output, overwrite=True) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp.parent) as staging:
            modules = {}
            for task, (appended, length) in routes.items():
                _template_tokenizer(tokenizer, appended, [])
                tokenizer.model_max_length = length
                directory = Path(staging) / task
                model.save_pretrained(directory, safe_serialization=True)
                tokenizer.save_pretrained(directory)
                modules[task] = Transformer(str(directory), max_seq_length=length,
                                            model_kwargs={"attn_implementation": "sdpa"})
            dim = model.config.hidden_size
            pipeline = [Router({task: [module] for task, module in modules.items()}, default_route="document"),
                        Pooling(dim, pooling_mode="lasttoken")]
            if config.normalize:
                pipeline.append(Normalize())
            st = SentenceTransformer(modules=pipeline, device="cpu", prompts=prompts, default_prompt_name="document",
                                     similarity_fn_name="cosine" if config.normalize else "dot")
            st.save(str(tmp))
        for task, (appended, length) in routes.items():
            # our tokenizer files, loaded through the plain `tokenizers` backend (see export_sentence_transformers)
            route_dir = tmp / f"{task}_0_Transformer"
            _template_tokenizer(tokenizer, appended, [])
            tokenizer.model_max_length = length
            tokenizer.save_pretrained(route_dir)
            bert_config = json.loads((route_dir / "sentence_bert_config.json").read_text(encoding="utf-8"))
            bert_config.setdefault("processor_kwargs", {})["tokenizer_type"] = "gpt_bigcode"
            (route_dir / "sentence_bert_config.json").write_text(json.dumps(bert_config, indent=4) + "\n",
                                                                 encoding="utf-8")
        (tmp / "convret_export.json").write_text(json.dumps(
            {**info, "routes": {task: {"appended": appended, "max_length": length}
                                for task, (appended, length) in routes.items()}}, indent=2) + "\n", encoding="utf-8")
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret export",
        description="Write a directory that SentenceTransformer(OUT) loads and that encodes like `convret encode`: "
                    "encode / encode_document on passages (prompt 'document', cut at max_passage_len), encode_query "
                    "on sessions (prompt 'query'; a session with history as convret.retrieval.export.session_text "
                    "gives it). Last-token pooling at the summary token, appended by the saved tokenizer. LoRA "
                    "checkpoints: base + adapter, or --merge. docs/retrieval.md lists what it reproduces.")
    p.add_argument("checkpoint", help="convret checkpoint directory")
    p.add_argument("output", help="directory to write")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output exported from another checkpoint (or not an export); without it "
                        "that is an error naming the difference")
    return p


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    try:
        out = export_sentence_transformers(args.checkpoint, args.output, args.merge, args.overwrite)
    except (ValueError, OSError) as error:
        print(f"convret export: error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} to {out}: SentenceTransformer({str(out)!r})", file=sys.stderr)
    refused = json.loads((out / "convret_export.json").read_text(encoding="utf-8")).get("queries")
    if refused:
        print(f"convret export: passages only; queries {refused}", file=sys.stderr)
    return 0
