"""convret: session-masked attention and fused contrastive losses for conversational dense retrievers."""
from .layout import SessionLayout
from .ops.session_attention import session_attention, available_backends
from .ops.info_nce import info_nce, InfoNCELoss
from .ops.linear_cross_entropy import linear_cross_entropy, LinearCrossEntropy
from ._info import backend_info
from .collate import CSITBatch, CSITCollator, CSITExample
from .csit import csit_loss, CSITLoss, CSITLossOutput
from .memory import enable_cpu_caching_allocator, tune_cpu_malloc

# Hugging Face integration (transformers is imported there, not here): `import convret.hf`.
__all__ = [
    "SessionLayout", "session_attention", "available_backends", "backend_info", "info_nce", "InfoNCELoss",
    "linear_cross_entropy", "LinearCrossEntropy",
    "CSITBatch", "CSITCollator", "CSITExample", "csit_loss", "CSITLoss", "CSITLossOutput",
    "enable_cpu_caching_allocator", "tune_cpu_malloc",
]
__version__ = "0.1.0"
