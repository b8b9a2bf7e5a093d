"""What a resumed run must share with the checkpoint it resumes: the resume fingerprint.

Every ``checkpoint-N`` holds ``convret_resume.json``: the training data (by content, :func:`convret.provenance.
content_identity`: a moved or copied file is the same data), the sequence settings, the recipe and the model.
``convret train`` resuming from a checkpoint compares them with the run's own before any model is loaded:

- a difference that changes what is trained is refused, naming each field (``old -> new``): the checkpoint's
  optimizer state, the consumed batches and the ``convret_config.json`` saved at the end would otherwise describe
  a run that never happened;
- a difference that changes nothing of it (a training file moved or copied, the GradCache chunking) is printed
  with the reason it is safe;
- ``--resume_with_changes`` resumes anyway, printing each change.

A checkpoint written by an older convret has no fingerprint: the resume is not checked, and says so.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..provenance import content_identity

__all__ = ["RESUME_NAME", "SAFE_CHANGES", "resume_fingerprint", "check_resume", "write_resume_fingerprint"]

RESUME_NAME = "convret_resume.json"

# fields whose change leaves what is trained as it is, and why
SAFE_CHANGES = {
    "train_file_path": "the training data has the same content (a moved or copied file)",
    "corpus_path": "the corpus has the same content (a moved or copied file)",
    "gradcache_chunk_rows": "GradCache computes the same gradients in any chunking",
}

_SEQUENCE = ("max_session_len", "max_passage_len", "max_response_len", "max_len", "instruction",
             "passage_instruction", "summary_on_passages", "chatretriever_compat", "separator_token", "num_negatives",
             "sample_negatives", "max_examples", "train_format")
_MODEL = ("init_seed", "num_summary_tokens", "reuse_summary_tokens", "train_summary_tokens", "lora", "lora_r",
          "lora_alpha", "lora_dropout", "lora_target_modules", "trust_remote_code")


def _source(value: str | None) -> str | None:
    """A model / tokenizer / config by content when it is a local path, else its name (a hub id)."""
    if value is None:
        return None
    return content_identity(value) if os.path.exists(value) else value


def resume_fingerprint(model_args: Any, data_args: Any, loss_args: Any, train_files: list[Any] | None = None,
                       default_train_file: str | None = None, examples_given: bool = False) -> dict[str, Any]:
    """The fingerprint of a run (module docstring), one flat mapping. ``train_files``: the parsed sources of a
    mixture; ``default_train_file``: the file read when ``train_file`` is unset; ``examples_given``: the examples
    came from the caller, not from files."""
    out: dict[str, Any] = {}
    if examples_given:
        out["train_data"] = "given in memory"
    elif train_files:
        out["train_files"] = [{"name": s.name, "data": content_identity(s.path), "format": s.format,
                               "weight": s.weight, "corpus": None if s.corpus is None else content_identity(s.corpus)}
                              for s in train_files]
        out["train_file_path"] = [str(s.path) for s in train_files]
    else:
        path = data_args.train_file or default_train_file
        out["train_file"] = content_identity(path) if path else None
        out["train_file_path"] = str(path) if path else None
    if not examples_given and data_args.corpus:
        out["corpus"] = content_identity(data_args.corpus)
        out["corpus_path"] = str(data_args.corpus)
    for key in _SEQUENCE:
        out[key] = getattr(data_args, key)
    for key, value in dataclasses.asdict(loss_args).items():
        out[key] = value
    out["model_name_or_path"] = _source(model_args.model_name_or_path)
    out["model_config"] = _source(model_args.model_config)
    out["tokenizer"] = _source(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    for key in _MODEL:
        out[key] = getattr(model_args, key)
    return json.loads(json.dumps(out))  # as it reads back from the file


def write_resume_fingerprint(checkpoint: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
    """Write ``fingerprint`` into a checkpoint directory being saved (inside its atomic rename)."""
    (Path(checkpoint) / RESUME_NAME).write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n",
                                                encoding="utf-8")


def check_resume(checkpoint: str | os.PathLike, fingerprint: dict[str, Any], allow_changes: bool = False
                 ) -> list[str]:
    """Compare the run's ``fingerprint`` with the one ``checkpoint`` records. Returns the lines to print: the safe
    changes with their reason, the unsafe ones when ``allow_changes``, or a note that nothing could be checked.

    Raises:
        ValueError: a change that alters what is trained (each named), unless ``allow_changes``.
    """
    path = Path(checkpoint) / RESUME_NAME
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{checkpoint} records no resume fingerprint (an older convret): its data and settings cannot be "
                "compared with this run's"]
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from error
    changed = [k for k in sorted(set(recorded) | set(fingerprint)) if recorded.get(k) != fingerprint.get(k)]
    safe = [k for k in changed if k in SAFE_CHANGES]
    unsafe = [k for k in changed if k not in SAFE_CHANGES]
    notes = [f"{k} changed ({recorded.get(k)!r} -> {fingerprint.get(k)!r}), safe: {SAFE_CHANGES[k]}" for k in safe]
    if unsafe:
        listed = "; ".join(f"{k}: {recorded.get(k)!r} -> {fingerprint.get(k)!r}" for k in unsafe)
        if not allow_changes:
            raise ValueError(f"cannot resume from {checkpoint}: this run's data or settings differ from the ones it "
                             f"was trained with ({listed}). Restore them to continue that run, start a new one "
                             "(another --output_dir, or --overwrite_output_dir), or pass --resume_with_changes if "
                             "the change is meant")
        notes.append(f"resuming with changes (--resume_with_changes): {listed}")
    return notes
