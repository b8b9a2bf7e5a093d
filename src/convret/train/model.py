"""Building the model to train: base weights (a hub id / directory, or a JSON config for a random init), the
summary tokens, LoRA through PEFT or full fine-tuning, and the :class:`RetrieverConfig` that goes into every
checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .arguments import DataArguments, LossArguments, ModelArguments
from .checkpoint import RetrieverConfig

__all__ = ["BuiltModel", "build_model", "load_tokenizer", "trainable_parameter_count"]


class BuiltModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    config: RetrieverConfig


def load_tokenizer(args: ModelArguments) -> Any:
    from transformers import AutoTokenizer

    source = args.tokenizer_name_or_path or args.model_name_or_path
    if source is None:
        raise ValueError("no tokenizer: set tokenizer_name_or_path (or model_name_or_path)")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _base_model(args: ModelArguments) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import hf  # noqa: F401  (registers attn_implementation="convret")

    kwargs = {"attn_implementation": "convret", "trust_remote_code": args.trust_remote_code}
    if args.model_name_or_path is not None:
        # fp32 master weights: mixed precision is autocast on top (TrainingArguments.bf16)
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32, **kwargs)
    if args.model_config is None:
        raise ValueError("set model_name_or_path (pretrained weights) or model_config (a JSON config to build "
                         "a randomly initialised model from)")
    path = Path(args.model_config)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable model config ({error})") from error
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: the model config needs a model_type (e.g. qwen2)")
    config = AutoConfig.for_model(model_type, **values)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)


def build_model(model_args: ModelArguments, data_args: DataArguments, loss_args: LossArguments) -> BuiltModel:
    """The model ready to train (summary tokens added, LoRA applied or not), its tokenizer and its
    :class:`RetrieverConfig`. The model is built whole even when a DeepSpeed ZeRO-3 config is active (the engine
    partitions it later, :func:`convret.train.engines.building_plain_model`). Every random initialisation (a model_config model, LoRA's A matrices) draws from
    ``model_args.init_seed``, whatever the caller's RNG state."""
    from .engines import building_plain_model

    with torch.random.fork_rng(devices=[]), building_plain_model():
        torch.manual_seed(model_args.init_seed)
        return _build_model(model_args, data_args, loss_args)


def _build_model(model_args: ModelArguments, data_args: DataArguments, loss_args: LossArguments) -> BuiltModel:
    from ..data.summary_tokens import add_summary_tokens

    tokenizer = load_tokenizer(model_args)
    model = _base_model(model_args)
    model.config.use_cache = False  # with a cache, HF models ignore packed position_ids
    if getattr(model.config, "attention_dropout", 0.0):
        model.config.attention_dropout = 0.0  # not supported with session layouts
    base_rows = int(model.get_input_embeddings().weight.shape[0])
    summary = add_summary_tokens(model, tokenizer, model_args.num_summary_tokens,
                                 reuse=model_args.reuse_summary_tokens)
    if model_args.lora:
        from peft import LoraConfig, get_peft_model

        lora_kwargs: dict[str, Any] = {}
        if model_args.train_summary_tokens:
            lora_kwargs["trainable_token_indices"] = {"embed_tokens": list(summary.ids)}
        lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                          lora_dropout=model_args.lora_dropout, target_modules=list(model_args.lora_target_modules),
                          task_type="CAUSAL_LM", **lora_kwargs)
        model = get_peft_model(model, lora)
    config = RetrieverConfig(
        summary_tokens=list(summary.tokens), summary_token_ids=list(summary.ids), recipe=loss_args.recipe,
        base_model=model_args.model_name_or_path, normalize=loss_args.normalize,
        temperature=float(loss_args.temperature), max_session_len=data_args.max_session_len,
        max_passage_len=data_args.max_passage_len, max_response_len=data_args.max_response_len,
        instruction=data_args.instruction, passage_instruction=data_args.passage_instruction,
        summary_on_passages=data_args.summary_on_passages, base_embedding_rows=base_rows,
    )
    if data_args.chatretriever_compat:
        config.chatretriever_compat = True
        config.separator_token, config.separator_token_id = _separator(tokenizer, data_args.separator_token)
    elif data_args.separator_token is not None:
        raise ValueError("separator_token is only used with chatretriever_compat: true")
    return BuiltModel(model, tokenizer, config)


def _separator(tokenizer: Any, token: str | None) -> tuple[str, int]:
    """The separator token of chatretriever_compat (the tokenizer's EOS by default) and its id; it must exist."""
    token = token if token is not None else tokenizer.eos_token
    if token is None:
        raise ValueError("chatretriever_compat: the tokenizer has no EOS token; set separator_token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id < 0 or (token_id == tokenizer.unk_token_id
                                                         and token != tokenizer.unk_token):
        raise ValueError(f"separator_token {token!r} is not a token of the tokenizer")
    return token, int(token_id)


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
