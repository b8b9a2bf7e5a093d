"""``convret export``: a sentence-transformers model directory from a convret checkpoint.

``SentenceTransformer(OUT)`` loads it and encodes to the same vectors as ``convret encode``:

- ``modules.json``: Transformer, ``1_Pooling`` (``pooling_mode_lasttoken``: the last summary token),
  ``2_Normalize`` when the model was trained on normalised embeddings (without ``modules.json``
  sentence-transformers would silently mean-pool);
- the tokenizer's post-processor appends what follows a passage's text in training (the end of the assistant
  message) and the summary tokens, so the input ids equal convret's formatter's;
- ``config_sentence_transformers.json``: prompt ``"document"`` (the default) = the start of the assistant message
  a passage is formatted as, prompt ``"query"`` = nothing (a session is given as its formatted text, see
  :func:`session_text`), ``similarity_fn_name`` cosine (normalised) or dot;
- merged (``--merge``, or a fully fine-tuned checkpoint): the whole model in OUT; otherwise the LoRA adapter in
  OUT over the base model in ``OUT/base`` (its absolute path is written into ``adapter_config.json``: move the
  directory and re-export, or use ``--merge``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..data.records import Turn
from . import _data

__all__ = ["export_sentence_transformers", "passage_wrapping", "session_text", "main"]


def passage_wrapping(tokenizer: Any, formatter: Any) -> tuple[list[int], list[int]]:
    """``(prefix ids, suffix ids)`` that the formatter puts around a passage's own tokens."""
    special = set(tokenizer.all_special_ids)
    probe_ids = [i for i in range(len(tokenizer)) if i not in special][5:8]
    probe = tokenizer.decode(probe_ids)
    text_ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = list(formatter.passage(probe))
    for start in range(len(ids) - len(text_ids) + 1):
        if ids[start : start + len(text_ids)] == text_ids:
            return ids[:start], ids[start + len(text_ids):]
    raise ValueError("cannot locate a passage's text inside its formatted ids: this formatter cannot be expressed "
                     "as a tokenizer template")


def session_text(tokenizer: Any, config: Any, history: Sequence[Turn], query: str) -> str:
    """The text to give an exported model (``model.encode_query(text)``) for a session: the formatted session
    without the end that the exported tokenizer appends itself."""
    formatter = _data.formatter_for(tokenizer, config)
    _, suffix = passage_wrapping(tokenizer, formatter)
    ids = list(formatter.session(history, query))
    if suffix and ids[-len(suffix):] != suffix:
        raise ValueError("sessions and passages end differently in this format; encode sessions with convret")
    return tokenizer.decode(ids[: len(ids) - len(suffix)] if suffix else ids)


def _prompt_text(tokenizer: Any, prefix: list[int]) -> str:
    """Text whose tokens, followed by any passage's, are ``prefix`` + the passage's (decoding may drop the
    separator a word-level tokenizer needs)."""
    probe = tokenizer.decode([i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)][5:8])
    expected = prefix + tokenizer(probe, add_special_tokens=False)["input_ids"]
    for text in (tokenizer.decode(prefix), tokenizer.decode(prefix) + " "):
        if tokenizer(text + probe, add_special_tokens=False)["input_ids"] == expected:
            return text
    raise ValueError("cannot express the passage prefix as a sentence-transformers prompt for this tokenizer")


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
                                 overwrite: bool = True) -> Path:
    """Write the sentence-transformers directory for ``checkpoint`` to ``output`` (atomically)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    from .._io import atomic_directory
    from ..train.checkpoint import load_retriever

    if not merge:
        _check_adapter_loading(checkpoint)
    loaded = load_retriever(checkpoint, merge=merge, attn_implementation="sdpa")
    model, tokenizer, config = loaded
    formatter = _data.formatter_for(tokenizer, config)
    prefix, suffix = passage_wrapping(tokenizer, formatter)
    prompt = _prompt_text(tokenizer, prefix)
    summary = config.summary_block() if config.summary_on_passages else []
    _template_tokenizer(tokenizer, suffix, summary)
    # sentence-transformers applies a tokenizer's chat template to plain text itself (as a user message, without
    # the post-processor): the exported tokenizer has none, its template already gives convret's ids
    tokenizer.chat_template = None
    output = Path(output).resolve()
    adapter = hasattr(model, "peft_config")
    with atomic_directory(output, overwrite=overwrite) as tmp:
        hf_dir = tmp
        if adapter:
            base_dir = output / "base"  # where it will be after the rename
            base = model.get_base_model()
            import copy

            copy.deepcopy(model).unload().save_pretrained(tmp / "base", safe_serialization=True)
            model.peft_config["default"].base_model_name_or_path = str(tmp / "base")  # final path set below
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp / "base")
            del base
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        max_len = (config.max_passage_len or 512) + len(summary) + len(suffix) + len(prefix)
        transformer = Transformer(str(hf_dir), max_seq_length=max(max_len, config.max_session_len or 0),
                                  model_kwargs={"attn_implementation": "sdpa"})
        dim = transformer.get_embedding_dimension() if hasattr(transformer, "get_embedding_dimension") else \
            transformer.get_word_embedding_dimension()
        modules = [transformer, Pooling(dim, pooling_mode="lasttoken")]
        if config.normalize:
            modules.append(Normalize())
        st = SentenceTransformer(modules=modules, device="cpu",
                                 prompts={"document": prompt, "query": ""},
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
             "appended": suffix + summary}, indent=2) + "\n", encoding="utf-8")
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret export",
        description="Write a directory that SentenceTransformer(OUT) loads and that encodes passages and "
                    "formatted sessions to the same vectors as `convret encode` (last-token pooling at the summary "
                    "token, appended by the saved tokenizer). LoRA checkpoints: base + adapter, or --merge.")
    p.add_argument("checkpoint", help="convret checkpoint directory")
    p.add_argument("output", help="directory to write")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the weights")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_sentence_transformers(args.checkpoint, args.output, args.merge)
    except (ValueError, OSError) as error:
        print(f"convret export: error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} to {out}: SentenceTransformer({str(out)!r})", file=sys.stderr)
    return 0
