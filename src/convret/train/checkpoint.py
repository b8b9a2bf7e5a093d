"""Self-describing retriever checkpoints: everything encoding needs, in one directory.

Layout of a checkpoint directory ``CKPT/``::

    convret_config.json        RetrieverConfig: recipe, summary tokens and ids, pooling, normalisation,
                               sequence lengths and formatting options, the base model
    tokenizer files            the tokenizer, its summary tokens included
    config.json, model.safetensors                 full fine-tuning: the whole *ForCausalLM
    adapter_config.json, adapter_model.safetensors LoRA: the PEFT adapter ...
    embedding_rows.safetensors ... the embedding rows that differ from the base model's (the summary tokens' rows
                               as initialised, every row a resize added; input and, when untied, output
                               embeddings), redone on the base before the adapter is applied ...
    base/                      ... and the base weights when the base cannot be loaded by name (a model built
                               from a config); absent when ``base_model`` names a hub id or a path

A LoRA checkpoint records the base model's embedding rows (``base_embedding_rows``) and the trained model's
(``embedding_rows``): when the summary tokens made the matrix grow (Llama-3, Mistral: rows = tokenizer size),
loading resizes the base the same way and writes the saved rows into it, so the model is the trained one,
bitwise.

Written atomically (a temporary directory beside it, flushed, then renamed), so a directory with
``convret_config.json`` is always complete. :func:`load_retriever` rebuilds the model, the tokenizer and the
config from it alone.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._io import atomic_directory

__all__ = ["RetrieverConfig", "LoadedRetriever", "save_retriever", "load_retriever", "CONFIG_NAME",
           "is_checkpoint", "write_retriever", "EMBEDDING_ROWS_NAME", "embedding_matrices"]

CONFIG_NAME = "convret_config.json"
EMBEDDING_ROWS_NAME = "embedding_rows.safetensors"
FORMAT_VERSION = 2  # 2: base_embedding_rows / embedding_rows and embedding_rows.safetensors (LoRA)


@dataclass
class RetrieverConfig:
    """What a model needs besides its weights to embed sessions and passages exactly as it was trained.

    Attributes:
        summary_tokens, summary_token_ids: the t summary tokens (names and ids in the saved tokenizer).
        recipe: ``"csit"`` or ``"uniconv"``.
        base_model: hub id or path of the base model the run started from; ``None`` when built from a config
            (then a LoRA checkpoint carries the base weights in ``base/``).
        adapter: the weights are a PEFT adapter over the base (LoRA) rather than the full model.
        pooling: ``"last_summary_token"``: the final hidden state of the last summary token.
        normalize: L2-normalise embeddings (scores are cosine similarities; the model was trained so).
        temperature: the InfoNCE temperature at the end of training (informative; search uses inner products).
        max_session_len, max_passage_len, max_response_len: token budgets used in training.
        instruction: text prefixed to every session (never truncated), or ``None``.
        passage_instruction: text prefixed to every passage, or ``None``.
        summary_on_passages: passages end with the summary tokens too (pooled there) or pool at their last token.
        chatretriever_compat: the separator between session and response is visible to the response
            (ChatRetriever's released code): every summary block is ``[separator, EMB_1..EMB_t]``, for sessions,
            passages and LM samples alike (:meth:`summary_block`).
        separator_token, separator_token_id: that separator (``None`` unless ``chatretriever_compat``).
        model_dtype: dtype the weights were saved in.
        base_embedding_rows: embedding rows of the base model as loaded, before the summary tokens (``None``:
            unknown, e.g. a model built in memory).
        embedding_rows: embedding rows of the saved model (more than ``base_embedding_rows`` when the summary
            tokens needed new rows: loading a LoRA checkpoint resizes the base to this).
    """

    summary_tokens: list[str]
    summary_token_ids: list[int]
    recipe: str = "csit"
    base_model: str | None = None
    adapter: bool = False
    pooling: str = "last_summary_token"
    normalize: bool = True
    temperature: float = 0.01
    max_session_len: int | None = 1024
    max_passage_len: int | None = 384
    max_response_len: int | None = 384
    instruction: str | None = None
    passage_instruction: str | None = None
    summary_on_passages: bool = True
    chatretriever_compat: bool = False
    separator_token: str | None = None
    separator_token_id: int | None = None
    model_dtype: str = "float32"
    base_embedding_rows: int | None = None
    embedding_rows: int | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def summary_block(self) -> list[int]:
        """The ids appended to a session (and to a passage with ``summary_on_passages``) to embed it:
        ``[separator, *summary_token_ids]`` under ``chatretriever_compat``, else the summary tokens."""
        if self.chatretriever_compat:
            if self.separator_token_id is None:
                raise ValueError("chatretriever_compat checkpoint without a separator_token_id")
            return [int(self.separator_token_id), *self.summary_token_ids]
        return list(self.summary_token_ids)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "RetrieverConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable convret config ({error})") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {version} is newer than this convret ({FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
        missing = [name for name in ("summary_tokens", "summary_token_ids") if name not in data]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        return cls(**data)


class LoadedRetriever(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    config: RetrieverConfig


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A complete convret checkpoint directory (the config is written last, inside the atomic rename)."""
    return (Path(path) / CONFIG_NAME).is_file()


def save_retriever(
    path: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    config: RetrieverConfig,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (a ``*ForCausalLM`` or a PEFT wrapper of one), ``tokenizer`` and ``config`` to ``path``
    atomically. ``config.adapter`` is set from the model; a LoRA model whose ``config.base_model`` is ``None``
    gets its base weights saved in ``base/``."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_retriever(tmp, model, tokenizer, config)
    return path


def write_retriever(
    directory: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, config: RetrieverConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The files of a retriever checkpoint, written into an existing (temporary) directory, the config last.
    Not atomic by itself: :func:`save_retriever` and the trainer's checkpoint saving call it inside a temporary
    directory that is renamed into place afterwards."""
    directory = Path(directory)
    config = copy.deepcopy(config)
    config.adapter = is_peft_model(model)
    config.model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config.format_version = FORMAT_VERSION
    input_weight, _ = embedding_matrices(model)
    config.embedding_rows = int(input_weight.shape[0])
    if config.adapter:
        # PEFT would save both whole embedding matrices after a resize (gigabytes for a 7B model) and nothing
        # at all when the rows already existed (Qwen's spare rows): the rows that differ are saved here instead
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)
        _write_embedding_rows(directory / EMBEDDING_ROWS_NAME, model, config)
    else:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if config.adapter and config.base_model is None:
        base = copy.deepcopy(model).unload()  # the base without LoRA layers, trainable-token rows as they began
        base.save_pretrained(directory / "base", safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / CONFIG_NAME).write_text(config.to_json(), encoding="utf-8")


def load_retriever(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    merge: bool = False,
    attn_implementation: str = "convret",
) -> LoadedRetriever:
    """Load a checkpoint written by :func:`save_retriever` (or by ``convret train``).

    Args:
        path: the checkpoint directory.
        device, dtype: where and in which dtype to put the weights (default: the saved dtype).
        merge: merge a LoRA adapter into the base weights (a plain model afterwards).
        attn_implementation: ``"convret"`` (session layouts) or any Hugging Face implementation.

    Raises:
        ValueError: not a checkpoint, or weights and tokenizer / config that do not belong together.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from .. import hf  # noqa: F401  (registers attn_implementation="convret")

    path = Path(path)
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not a convret checkpoint (no {CONFIG_NAME}); expected a directory written "
                         "by `convret train` (OUTPUT_DIR/final or OUTPUT_DIR/checkpoint-N)")
    config = RetrieverConfig.from_file(path / CONFIG_NAME)
    # a plain `tokenizers` tokenizer (TokenizersBackend) must not be rebuilt as the model type's tokenizer class
    plain = '"TokenizersBackend"' in (path / "tokenizer_config.json").read_text(encoding="utf-8")
    tokenizer = (PreTrainedTokenizerFast if plain else AutoTokenizer).from_pretrained(path)
    dtype = dtype or getattr(torch, config.model_dtype)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if config.adapter:
        from peft import PeftModel

        base_source = path / "base" if config.base_model is None else config.base_model
        model = AutoModelForCausalLM.from_pretrained(base_source, **kwargs)
        _redo_embedding_rows(model, path, config)
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            raise ValueError(f"{path}: the base model has {rows} embedding rows but the tokenizer {len(tokenizer)} "
                             "tokens; the base model is not the one this adapter was trained on")
        model = PeftModel.from_pretrained(model, path)
        if merge:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    bad = [i for i in config.summary_token_ids if i >= rows]
    if bad or [tokenizer.convert_tokens_to_ids(t) for t in config.summary_tokens] != config.summary_token_ids:
        raise ValueError(f"{path}: summary tokens {config.summary_tokens} / ids {config.summary_token_ids} do not "
                         f"match the saved tokenizer and model ({rows} embedding rows)")
    model.to(device).eval()
    return LoadedRetriever(model, tokenizer, config)


def _plain_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight of an embedding / LM head under PEFT wrappers (trainable tokens, LoRA): the base layer's."""
    while True:
        if hasattr(module, "token_adapter"):
            module = module.token_adapter
        elif hasattr(module, "base_layer"):
            module = module.base_layer
        else:
            return module.weight


def embedding_matrices(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input embedding weight, output embedding weight or None when tied or absent)`` of a ``*ForCausalLM``
    or a PEFT wrapper of one: the base weights, without trainable-token deltas or LoRA."""
    base = model.get_base_model() if is_peft_model(model) else model
    input_weight = _plain_weight(base.get_input_embeddings())
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    output_weight = _plain_weight(output) if output is not None else None
    if output_weight is not None and output_weight.data_ptr() == input_weight.data_ptr():
        output_weight = None
    return input_weight, output_weight


def _changed_rows(config: RetrieverConfig, rows: int) -> list[int]:
    """The rows of a model's embeddings that may differ from its base's: the summary tokens' and every row
    beyond the base's."""
    start = config.base_embedding_rows if config.base_embedding_rows is not None else rows
    return sorted(set(config.summary_token_ids) | set(range(start, rows)))


def _write_embedding_rows(file: Path, model: torch.nn.Module, config: RetrieverConfig) -> None:
    from safetensors.torch import save_file

    input_weight, output_weight = embedding_matrices(model)
    ids = _changed_rows(config, input_weight.shape[0])
    index = torch.tensor(ids, dtype=torch.long, device=input_weight.device)
    tensors = {"ids": index.cpu(), "input": input_weight.detach().index_select(0, index).cpu().contiguous()}
    if output_weight is not None:
        tensors["output"] = output_weight.detach().index_select(0, index).cpu().contiguous()
    save_file(tensors, str(file))


def _adapter_embedding_rows(path: Path) -> int | None:
    """Rows of an input embedding matrix a format-1 adapter holds (PEFT saved both matrices after a resize)."""
    from safetensors import safe_open

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():
            if "embed_tokens" in key and key.endswith("weight") and "lora" not in key:
                return int(handle.get_slice(key).get_shape()[0])
    return None


@torch.no_grad()
def _redo_embedding_rows(model: torch.nn.Module, path: Path, config: RetrieverConfig) -> None:
    """Give the freshly loaded base model the embedding rows the adapter was trained on: the resize the summary
    tokens needed, then the saved rows (summary tokens, new rows) written in."""
    rows = model.get_input_embeddings().weight.shape[0]
    target = config.embedding_rows
    if target is None:  # a format-1 checkpoint: PEFT saved whole matrices after a resize, loaded with the adapter
        target = _adapter_embedding_rows(path) or rows
    if rows != target:
        if rows > target or (config.base_embedding_rows is not None and rows != config.base_embedding_rows):
            expected = config.base_embedding_rows if config.base_embedding_rows is not None else f"< {target}"
            raise ValueError(f"{path}: the base model {config.base_model or path / 'base'} has {rows} embedding "
                             f"rows, the one this adapter was trained on had {expected}; load the adapter on its "
                             "own base model")
        with torch.random.fork_rng(devices=[]):  # resizing draws the new rows at random: they are overwritten
            model.resize_token_embeddings(target, mean_resizing=False)
    file = path / EMBEDDING_ROWS_NAME
    if not file.is_file():
        if config.embedding_rows is not None and rows != target:
            raise ValueError(f"{path}: {EMBEDDING_ROWS_NAME} is missing (the embedding rows added for the summary "
                             "tokens); the checkpoint is incomplete")
        return
    from safetensors.torch import load_file

    saved = load_file(str(file))
    ids = saved["ids"].tolist()
    missing = sorted(set(range(rows, target)) - set(ids))
    if missing or (ids and max(ids) >= target):
        raise ValueError(f"{path}: {EMBEDDING_ROWS_NAME} does not hold the rows {rows}..{target - 1} the resize "
                         "added; the checkpoint is incomplete")
    input_weight, output_weight = embedding_matrices(model)
    index = saved["ids"].to(input_weight.device)
    input_weight.index_copy_(0, index, saved["input"].to(input_weight))
    if output_weight is not None:
        if "output" not in saved:
            raise ValueError(f"{path}: {EMBEDDING_ROWS_NAME} has no output-embedding rows but the base model's "
                             "LM head is not tied to its input embeddings")
        output_weight.index_copy_(0, index, saved["output"].to(output_weight))


def is_peft_model(model: torch.nn.Module) -> bool:
    """A PEFT wrapper (not a transformers model that merely carries adapter attributes)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
