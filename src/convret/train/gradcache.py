"""GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") for
the one-pass batch: contrastive batches larger than the activations that fit in memory.

1. Embed: run the packed rows in chunks of ``chunk_rows`` without gradient and pool every embedding the recipe
   needs (the torch RNG state before each chunk is kept).
2. Contrast: the recipe's contrastive terms on the full batch of (detached, gradient-requiring) embeddings,
   weighted; ``torch.autograd.grad`` gives the plain gradients of that loss with respect to the embeddings
   (cached) and to the recipe's own parameters (the learnable temperature). Nothing is back-propagated into
   ``.grad`` here.
3. Re-run each chunk with gradient, its RNG state restored first (dropout draws the same masks as in step 1),
   and back-propagate ``sum(embedding * cached gradient)`` plus the chunk's weighted LM loss (normalised by the
   label tokens of the whole batch), and with the last chunk ``sum(parameter * its gradient)`` for the recipe's
   parameters, all times ``loss_scale``, through ``backward``.

Scaling happens exactly once, in step 3: ``loss_scale`` (1 / gradient accumulation steps) multiplies each
back-propagated surrogate, and ``backward`` (``accelerator.backward``) applies the fp16 GradScaler factor to it.
The cached gradients are unscaled; scaling them too would scale the contrastive gradient twice
(``loss_scale**2``, ``scaler_factor**2``).

Rows of a packed batch never attend to each other, so a chunk's hidden states equal the full batch's rows
and the parameter gradients equal the unchunked step's.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from ..collate import CSITBatch
from ..csit import decoder_hidden, unwrap_model
from ..layout import SessionLayout
from .recipes import Recipe, RecipeOutput

__all__ = ["gradcache_step", "row_chunk"]


def row_chunk(batch: CSITBatch, start: int, stop: int) -> CSITBatch:
    """Rows ``[start, stop)`` of a packed batch (pooling positions are left as they are: use the full batch's)."""
    layout = SessionLayout.from_segments(batch.layout.segments[start:stop], batch.layout.seq_len,
                                         device=batch.input_ids.device)
    return dataclasses.replace(batch, input_ids=batch.input_ids[start:stop],
                               position_ids=batch.position_ids[start:stop], labels=batch.labels[start:stop],
                               layout=layout)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def gradcache_step(
    model: torch.nn.Module,
    recipe: Recipe,
    batch: CSITBatch,
    chunk_rows: int,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    loss_scale: float = 1.0,
) -> RecipeOutput:
    """Forward AND backward of one batch in row chunks; returns the (detached) loss and terms.

    Args:
        model: the model (bare, PEFT or DDP-wrapped).
        recipe: the :class:`Recipe`.
        batch: the packed batch, on the model's device.
        chunk_rows: rows per chunk.
        backward: how to back-propagate a tensor (the Trainer passes ``accelerator.backward``).
        no_sync: a context manager factory that suspends DDP's gradient all-reduce; used for every re-run chunk
            but the last.
        loss_scale: multiplies everything back-propagated (1 / gradient accumulation steps), once.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    backward = backward or (lambda t: t.backward())
    no_sync = no_sync or contextlib.nullcontext
    device = batch.input_ids.device
    rows = batch.input_ids.shape[0]
    bounds = [(a, min(a + chunk_rows, rows)) for a in range(0, rows, chunk_rows)]
    positions = recipe.embedding_positions(batch)
    selections = {name: [((pos[:, 0] >= a) & (pos[:, 0] < b)).nonzero().squeeze(1) for a, b in bounds]
                  for name, pos in positions.items()}

    # 1. embed without gradient
    states = []
    pooled = {}
    with torch.no_grad():
        for c, (a, b) in enumerate(bounds):
            states.append(_rng_state(device))
            hidden = decoder_hidden(model, row_chunk(batch, a, b))
            for name, pos in positions.items():
                if name not in pooled:
                    pooled[name] = hidden.new_empty(pos.shape[0], hidden.shape[-1], dtype=torch.float32)
                index = selections[name][c]
                pooled[name][index] = hidden[pos[index, 0] - a, pos[index, 1]].float()
    end_state = _rng_state(device)
    embeddings = {name: value.requires_grad_() for name, value in pooled.items()}

    # 2. contrastive terms on the full batch; cache the (unscaled) gradients of the embeddings and of the
    # recipe's own parameters
    terms = recipe.contrastive_terms(embeddings, batch)
    embedding_loss = recipe.combine(terms)
    names = list(embeddings)
    recipe_params = [p for p in recipe.parameters() if p.requires_grad]
    inputs = [embeddings[name] for name in names] + recipe_params
    grads = torch.autograd.grad(embedding_loss, inputs, allow_unused=True) if embedding_loss.requires_grad \
        else [None] * len(inputs)
    cached = {name: (g if g is not None else torch.zeros_like(embeddings[name]))
              for name, g in zip(names, grads[:len(names)])}
    param_grads = [(p, g) for p, g in zip(recipe_params, grads[len(names):]) if g is not None]

    # 3. re-run each chunk with gradient
    head = unwrap_model(model).get_output_embeddings()
    num_label_tokens = recipe.global_label_tokens(batch.labels)
    generation_weight = recipe.weights["generation"]
    generation = torch.zeros((), dtype=torch.float32, device=device)
    for c, (a, b) in enumerate(bounds):
        _set_rng_state(states[c], device)
        context = no_sync() if c < len(bounds) - 1 else contextlib.nullcontext()
        with context:
            chunk = row_chunk(batch, a, b)
            hidden = decoder_hidden(model, chunk)
            surrogate = hidden.new_zeros((), dtype=torch.float32)
            for name, pos in positions.items():
                index = selections[name][c]
                if index.numel():
                    emb = hidden[pos[index, 0] - a, pos[index, 1]].float()
                    surrogate = surrogate + (emb * cached[name][index]).sum()
            chunk_generation = recipe.generation(hidden, head, chunk.labels, num_label_tokens=num_label_tokens)
            if c == len(bounds) - 1:
                for param, grad in param_grads:
                    surrogate = surrogate + (param * grad).sum()
            backward((surrogate + generation_weight * chunk_generation) * loss_scale)
        generation += chunk_generation.detach()
    _set_rng_state(end_state, device)
    terms = {name: value.detach() for name, value in terms.items()}
    terms["generation"] = generation
    return RecipeOutput(recipe.combine(terms), terms)
