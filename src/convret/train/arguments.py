"""Arguments of ``convret train``: dataclasses parsed by ``transformers.HfArgumentParser`` from a YAML config,
command-line flags overriding its fields.

Three convret dataclasses (model, data, loss) sit beside :class:`ConvretTrainingArguments`, a subclass of
``transformers.TrainingArguments``: every Trainer option keeps its own name (``output_dir``, ``max_steps``,
``save_steps``, ``logging_steps``, ``seed``, ``per_device_train_batch_size``, ``learning_rate``, ...).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transformers import HfArgumentParser, TrainingArguments

from .._args import did_you_mean, known_options, unknown_options

__all__ = ["ModelArguments", "DataArguments", "LossArguments", "ConvretTrainingArguments", "parse_arguments",
           "RECIPES", "RECIPE_DEFAULTS", "CONFIG_DIR", "DEFAULT_CONFIG"]

RECIPES = ("csit", "uniconv")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "resources" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"

# Per-recipe defaults of the loss fields left unset (None) by the config and the flags.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # ChatRetriever's released CSIT recipe
    "csit": {"alpha": 0.2, "generation_weight": 1.0, "temperature": 0.01, "label_smoothing": 0.1},
    # UniConv: L_R + L_G + alpha * L_CII (alpha is convret's choice, see docs/train.md)
    "uniconv": {"alpha": 0.5, "generation_weight": 1.0, "temperature": 0.01, "label_smoothing": 0.0},
}


@dataclass
class ModelArguments:
    """The model, its summary tokens and LoRA."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hugging Face model id or local directory of the base *ForCausalLM; or None with model_config"})
    model_config: str | None = field(default=None, metadata={
        "help": "JSON model config to build a randomly initialised model from (the tiny embedded default)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "tokenizer id or directory (default: model_name_or_path)"})
    init_seed: int = field(default=0, metadata={"help": "seed of the random initialisation of a model_config model"})
    num_summary_tokens: int = field(default=3, metadata={"help": "t, the number of summary tokens EMB_1..EMB_t"})
    reuse_summary_tokens: list[str] | None = field(default=None, metadata={
        "help": "existing token names to use as summary tokens (Qwen-v1: <|extra_0|> ...) instead of new ones"})
    train_summary_tokens: bool = field(default=True, metadata={
        "help": "under LoRA, train the summary tokens' embedding rows (PEFT trainable_token_indices)"})
    lora: bool = field(default=False, metadata={"help": "LoRA through PEFT (else full fine-tuning)"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"],
                                           metadata={"help": "module names LoRA adapts"})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast where the device supports it, else fp32), bf16, fp16 or no; weights stay fp32"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code (Qwen-v1)"})


@dataclass
class DataArguments:
    """Training data and sequence budgets."""

    train_file: str | None = field(default=None, metadata={"help": "training file (ultrachat, tevatron, qrecc, "
                                                                      "topiocqa style); default: the sample world"})
    train_format: str = field(default="auto", metadata={"help": "format of train_file (auto: detected)"})
    train_files: str | None = field(default=None, metadata={
        "help": "several sources with weights instead of train_file: 'a.jsonl:0.7,b.jsonl:0.3' (PATH[:WEIGHT"
                "[:FORMAT]]); in YAML a list of {path, weight, format, name, corpus}. Batches are homogeneous per "
                "source, in the weights' proportions (docs/train.md)"})
    corpus: str | None = field(default=None, metadata={"help": "collection joined by docid (Tevatron new format)"})
    max_examples: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    num_negatives: int = field(default=4, metadata={"help": "hard negatives per example (at most; fewer if the "
                                                            "data has fewer)"})
    sample_negatives: bool = field(default=True, metadata={
        "help": "draw num_negatives of an example's hard negatives (and one of its positives) at random per epoch, "
                "seeded by (seed, epoch, example); false: always the first ones"})
    max_session_len: int = field(default=1024, metadata={"help": "session token budget"})
    max_passage_len: int = field(default=384, metadata={"help": "passage token budget"})
    max_response_len: int = field(default=384, metadata={"help": "response token budget"})
    max_len: int | None = field(default=None, metadata={
        "help": "row length of the packed batch (default: the longest sequence a sample can have)"})
    instruction: str | None = field(default=None, metadata={"help": "text prefixed to every session"})
    passage_instruction: str | None = field(default=None, metadata={"help": "text prefixed to every passage"})
    summary_on_passages: bool = field(default=True, metadata={"help": "append the summary tokens to passages"})
    chatretriever_compat: bool = field(default=False, metadata={
        "help": "ChatRetriever's released sequences: a separator token opens every summary block ([SEP, EMB_1.."
                "EMB_t]) and stays visible to the response; recorded in the checkpoint for encode / evaluate / "
                "export"})
    separator_token: str | None = field(default=None, metadata={
        "help": "the separator of chatretriever_compat, an existing token of the tokenizer (default: its EOS "
                "token)"})


@dataclass
class LossArguments:
    """The recipe and its weights; None takes the recipe's default (RECIPE_DEFAULTS)."""

    recipe: str = field(default="csit", metadata={"help": "csit (ChatRetriever) or uniconv"})
    alpha: float | None = field(default=None, metadata={
        "help": "csit: weight of the LM loss L_S (0.2); uniconv: weight of L_CII (0.5)"})
    generation_weight: float | None = field(default=None, metadata={"help": "uniconv: weight of L_G (1.0)"})
    temperature: float | None = field(default=None, metadata={"help": "InfoNCE temperature tau (0.01)"})
    learnable_temperature: bool = field(default=False, metadata={"help": "learn tau (stored as log tau)"})
    label_smoothing: float | None = field(default=None, metadata={"help": "LM label smoothing (csit: 0.1)"})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise embeddings"})
    gather: bool = field(default=True, metadata={"help": "cross-rank negatives under torch.distributed"})
    gradcache_chunk_rows: int = field(default=0, metadata={
        "help": "GradCache: run the packed batch in chunks of this many rows (0: off)"})

    def resolved(self) -> "LossArguments":
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        values = {k: v for k, v in RECIPE_DEFAULTS[self.recipe].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **values)


@dataclass
class ConvretTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus convret's run control."""

    resume: str | None = field(default="auto", metadata={
        "help": "auto: the newest complete checkpoint in output_dir, or a fresh start when there is none; none: "
                "start fresh (an error if output_dir holds checkpoints); or a checkpoint path"})
    resume_with_changes: bool = field(default=False, metadata={
        "help": "resume even though the training data, sequence settings, recipe or model differ from the "
                "checkpoint's (each change is printed); without it such a resume is an error naming them"})
    stop_on_nonfinite: bool = field(default=True, metadata={"help": "stop at a NaN / inf loss"})
    cpu_caching_allocator: bool = field(default=True, metadata={
        "help": "on CPU, serve torch's large blocks from convret's caching allocator (convret.memory; faster "
                "steps, lower peak RSS); false keeps torch's default allocator"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "delete output_dir's checkpoints, init/, final/ and log.jsonl and start fresh (never resumes; "
                "exclusive with --resume)"})


def _dataclass_types():
    return (ModelArguments, DataArguments, LossArguments, ConvretTrainingArguments)


def valid_keys() -> list[str]:
    return sorted({f.name for t in _dataclass_types() for f in dataclasses.fields(t) if f.init})


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) mapping of field names to values; unknown keys are an error listing the valid ones."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the config ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of field names to values")
    unknown = sorted(set(data) - set(valid_keys()))
    if unknown:
        raise ValueError(f"{path}: " + "; ".join(f"unknown key {key!r}{did_you_mean(key, valid_keys())}"
                                                for key in unknown) + " (every key: convret train --help)")
    return data


def _resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative data / model paths of a bundled config are relative to the package's resources."""
    for key in ("model_config", "tokenizer_name_or_path", "train_file", "corpus"):
        value = values.get(key)
        if isinstance(value, str) and value.startswith("resources:"):
            values[key] = str(base / value.removeprefix("resources:"))
    return values


def parse_arguments(
    argv: Sequence[str] | None = None, config: str | os.PathLike | None = None,
) -> tuple[ModelArguments, DataArguments, LossArguments, ConvretTrainingArguments]:
    """Config file first, then the flags in ``argv`` on top. ``config=None`` uses the embedded tiny default.

    Raises:
        ValueError: an unknown key in the config or an unknown flag (the message lists the valid names).
    """
    parser = make_parser()
    unknown = unknown_options(parser, list(argv or []))
    if unknown:
        known = sorted(known_options(parser))
        raise ValueError("; ".join(f"unknown option {name}{did_you_mean(name, known)}" for name in unknown)
                         + " (every option: convret train --help)")
    values = load_config(config if config is not None else DEFAULT_CONFIG)
    values = _resolve_paths(values, CONFIG_DIR.parent)
    parser.set_defaults(**values)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=list(argv or []), return_remaining_strings=True)
    except ImportError as error:  # TrainingArguments imports the engine's package when it is asked for
        if "deepspeed" in str(error).lower():
            raise ValueError("--deepspeed: the package deepspeed is not installed (pip install 'convret[deepspeed]'"
                             f" or pip install deepspeed): {error}") from error
        raise
    if remaining:
        raise ValueError(f"unexpected arguments {remaining} (every option: convret train --help)")
    model_args, data_args, loss_args, train_args = parsed
    if data_args.train_files is not None:
        from .mixture import parse_train_files

        if data_args.train_file is not None:
            raise ValueError("train_file and train_files exclude each other: list every source in train_files")
        parse_train_files(data_args.train_files, CONFIG_DIR.parent)  # fail early on a malformed list
    flags = {arg.split("=", 1)[0] for arg in argv or [] if arg.startswith("--")}
    if "--model_name_or_path" in flags and "--tokenizer_name_or_path" not in flags:
        # the user's model comes with its own tokenizer: never the config's (the embedded default names the
        # sample world's, which would silently mismatch the model's vocabulary)
        model_args.tokenizer_name_or_path = None
    for key in ("model_config", "tokenizer_name_or_path", "train_file", "corpus"):
        for obj in (model_args, data_args):
            value = getattr(obj, key, None)
            if isinstance(value, str) and value.startswith("resources:"):
                setattr(obj, key, str(CONFIG_DIR.parent / value.removeprefix("resources:")))
    return model_args, data_args, loss_args.resolved(), train_args


def make_parser() -> HfArgumentParser:
    """The parser of every field, without abbreviations (``--max_step`` never means ``--max_steps``)."""
    return HfArgumentParser(_dataclass_types(), allow_abbrev=False)
