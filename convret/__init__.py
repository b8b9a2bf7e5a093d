"""convret: session-masked attention and fused contrastive losses for conversational dense retrievers."""
from .layout import SessionLayout
from .attention import session_attention, available_backends
from . import _triton_backend  # noqa: F401  (registers backend="triton")
from ._cpu_backend import backend_info  # also registers backend="cpu"
from .info_nce import info_nce, InfoNCELoss

__all__ = ["SessionLayout", "session_attention", "available_backends", "backend_info", "info_nce", "InfoNCELoss"]
__version__ = "0.1.0"
