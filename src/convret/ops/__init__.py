"""The ops: each a public function with its backends beside it, dispatched through one registry
(``convret._dispatch``; ``convret.backend_info()["ops"]`` lists them).

- ``session_attention/``: ``__init__`` (the face, the dense float64 oracle, the registry of backends),
  ``cpu`` (native C++ kernels of ``csrc/`` with a PyTorch fallback), ``triton`` (``convret.kernels``),
  ``cached`` (the cached prefill of the incremental session encoder).
- ``info_nce/``: ``__init__`` (the face, ``InfoNCELoss``, the temperature), ``cpu`` (query chunks),
  ``reference`` (full logits), ``gather`` (cross-rank passages with gradients).
- ``linear_cross_entropy``: the LM loss without full-vocabulary logits (chunked, PyTorch or Triton per chunk).
"""
