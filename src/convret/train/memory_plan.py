"""Per-GPU memory arithmetic of the training engines (DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3) for a decoder
trained with convret's one-pass CSIT / UniConv step.

What each rank holds, in bytes, with convret's defaults (fp32 master weights, AdamW: two fp32 states per
trainable parameter, bf16 compute on the GPU):

- **parameters**: DDP and ZeRO-2 every parameter on every rank; FSDP2 and ZeRO-3 ``1 / world`` of them. FSDP2
  keeps the fp32 weights sharded and gathers a bf16 copy per unit for compute; DeepSpeed's bf16 mode keeps the
  module in bf16 (2 bytes) and the fp32 master copy of the trainable parameters in its optimizer, partitioned
  (ZeRO-2 and ZeRO-3 alike).
- **gradients**: fp32 (bf16 under DeepSpeed's bf16 mode) for the trainable parameters; DDP whole, the others
  ``1 / world`` (ZeRO-2 reduce-scatters into its partition).
- **optimizer states**: 8 bytes per trainable parameter (AdamW's two moments), ``1 / world`` except under DDP.
- **transient**: what an engine gathers for compute: FSDP2 the bf16 weights of the unit running and the one
  prefetched, plus that unit's fp32 gradients before the reduce-scatter, and the embedding and LM-head units
  (accelerate keeps the head unsharded from the forward to its backward); ZeRO-3 the same for its live
  parameters.
- **activations** of ``tokens`` packed tokens per micro-batch: :func:`activation_bytes_per_token` (with the
  session attention kernel: O(L) per row, no ``[L, L]`` mask or scores).
- **InfoNCE gather**: the passage embeddings of every rank, fp32, and the ``[queries, global passages]`` scores.

Parameter, gradient and optimizer figures are exact for the engines' layouts; transient and activation figures
are estimates (stated assumptions), checked against measurement at tiny size by ``convret bench step --engines``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ModelShape", "RankMemory", "QWEN2_7B", "MISTRAL_7B", "lora_params", "model_state", "transient",
           "activation_bytes_per_token", "gather_bytes", "plan", "tokens_that_fit", "ENGINES", "GIB"]

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
GIB = 2 ** 30
ADAM_BYTES = 8  # two fp32 moments per trainable parameter


@dataclass(frozen=True)
class ModelShape:
    """A decoder's sizes (a Qwen2 / Llama / Mistral layer: attention with grouped KV heads, a gated MLP)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # KV heads x head dim
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * h * 2 + h * kv * 2 + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * i + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params * (1 if self.tied else 2) + self.hidden


QWEN2_7B = ModelShape("Qwen2-7B", layers=28, hidden=3584, intermediate=18944, kv_dim=512, vocab=152064, qkv_bias=True)
MISTRAL_7B = ModelShape("Mistral-7B", layers=32, hidden=4096, intermediate=14336, kv_dim=1024, vocab=32003)


def lora_params(shape: ModelShape, rank: int, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"), summary_tokens: int = 3) -> int:
    """Trainable parameters of LoRA (``r x (in + out)`` per adapted projection) plus the summary tokens' rows."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}
    per_layer = sum(rank * sum(dims[name]) for name in targets)
    return shape.layers * per_layer + summary_tokens * h


@dataclass
class RankMemory:
    """Bytes one rank holds (see the module docstring)."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    transient: int = 0
    activations: int = 0
    gather: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def model_state(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_state + self.transient + self.activations + self.gather


def model_state(engine: str, params: int, trainable: int, world: int, bf16: bool = True) -> RankMemory:
    """Parameters, gradients and optimizer states per rank (exact for the engine's layout).

    ``bf16``: the GPU run's precision. FSDP2 and DDP keep fp32 weights whatever it is (autocast / FSDP2's
    ``param_dtype`` casts per unit); DeepSpeed's bf16 mode holds the module in bf16, its gradients in bf16 and an
    fp32 master copy of the trainable parameters in the optimizer."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
    if engine == "ddp":
        return RankMemory(4 * params, 4 * trainable, ADAM_BYTES * trainable)
    if engine == "fsdp2":
        return RankMemory(-(-4 * params // world), -(-4 * trainable // world), -(-ADAM_BYTES * trainable // world))
    weight = 2 if bf16 else 4
    module = weight * params if engine == "zero2" else -(-weight * params // world)
    master = -(-4 * trainable // world) if bf16 else 0  # DeepSpeed's fp32 copy of the trainable partition
    return RankMemory(module + master, -(-weight * trainable // world), -(-ADAM_BYTES * trainable // world))


def transient(engine: str, shape: ModelShape, trainable_fraction: float, bf16: bool = True) -> int:
    """Bytes an engine gathers for compute at its peak (an estimate): the unit running and the one prefetched
    in the compute dtype, one unit's gradients before they are reduced, the embedding and LM-head units."""
    if engine in ("ddp", "zero2"):
        return 0
    compute = 2 if bf16 else 4
    layer, embedding = shape.layer_params, shape.embedding_params
    units = 2 * compute * layer + compute * embedding * (1 if shape.tied else 2)
    grads = int(4 * layer * trainable_fraction) + int(4 * embedding * trainable_fraction)
    return units + grads


def activation_bytes_per_token(shape: ModelShape, checkpointing: bool, bf16: bool = True) -> int:
    """Saved activations per packed token for the whole decoder (an estimate from the layer's saved tensors).

    Per layer and token, bf16 autocast on fp32 weights (the fp32 residual stream): the two RMSNorms' fp32 inputs
    and outputs (16 h), the bf16 casts of the projections' inputs (12 h), q / k / v with their rotary copies and
    the attention's own q, k, v, output and log-sum-exp (about 10 h + 12 kv; the session attention kernel keeps
    no [L, L] mask or score matrix), the o-projection input (2 h), the gated MLP's four [tokens, intermediate]
    tensors (8 i). fp32 compute doubles the bf16 terms. With gradient checkpointing each layer keeps only its
    fp32 input (4 h) and one layer is recomputed at a time; the final hidden states and their gradient (8 h) are
    added either way."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    scale = 1 if bf16 else 2
    layer = 16 * h + scale * (12 * h + 10 * h + 12 * kv + 2 * h + 8 * i) // 1
    if checkpointing:
        return shape.layers * 4 * h + layer + 8 * h
    return shape.layers * layer + 8 * h


def gather_bytes(world: int, queries: int, passages: int, hidden: int) -> int:
    """Cross-rank negatives on one rank: every rank's passage embeddings (fp32, with their gradient) and the
    ``[queries, world x passages]`` fp32 scores with their softmax."""
    global_passages = world * passages
    return 2 * 4 * global_passages * hidden + 2 * 4 * queries * global_passages


def plan(engine: str, shape: ModelShape, world: int, trainable: int, tokens: int, queries: int, passages: int,
         checkpointing: bool = True, bf16: bool = True) -> RankMemory:
    """Everything one rank holds for a micro-batch of ``tokens`` packed tokens with ``queries`` sessions and
    ``passages`` passages (positives and hard negatives)."""
    memory = model_state(engine, shape.params, trainable, world, bf16)
    memory.transient = transient(engine, shape, trainable / shape.params, bf16)
    memory.activations = tokens * activation_bytes_per_token(shape, checkpointing, bf16)
    memory.gather = gather_bytes(world, queries, passages, shape.hidden)
    return memory


def tokens_that_fit(engine: str, shape: ModelShape, world: int, trainable: int, capacity_bytes: int,
                    reserve_bytes: int = int(2.5 * GIB), checkpointing: bool = True, bf16: bool = True) -> int:
    """Packed tokens per micro-batch that fit in ``capacity_bytes`` after the model state, the transient
    buffers and ``reserve_bytes`` (CUDA context, allocator fragmentation, the LM loss's logits chunk); 0 when the
    model state alone does not fit."""
    fixed = model_state(engine, shape.params, trainable, world, bf16).model_state
    fixed += transient(engine, shape, trainable / shape.params, bf16) + reserve_bytes
    room = capacity_bytes - fixed
    return max(0, room // activation_bytes_per_token(shape, checkpointing, bf16))
