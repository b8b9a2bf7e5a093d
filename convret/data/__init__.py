"""Conversational data: readers for the field's formats, session sequences, summary tokens, the sample world."""
from .records import ASSISTANT, USER, EvalTurn, Passage, TrainingExample, Turn
from .summary_tokens import SummaryTokens, add_summary_tokens

__all__ = ["ASSISTANT", "USER", "EvalTurn", "Passage", "TrainingExample", "Turn", "SummaryTokens",
           "add_summary_tokens"]
