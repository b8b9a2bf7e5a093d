"""Training: the Hugging Face Trainer subclass, the CSIT and UniConv recipes, self-describing checkpoints."""
from .checkpoint import LoadedRetriever, RetrieverConfig, load_retriever, save_retriever

__all__ = ["LoadedRetriever", "RetrieverConfig", "load_retriever", "save_retriever"]
