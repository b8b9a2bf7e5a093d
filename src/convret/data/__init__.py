"""Conversational data: readers for the field's formats, session sequences, summary tokens, the sample world."""
from .readers import (CONVERSATION_FORMATS, FORMATS, MAX_REPORTED_ERRORS, TRAINING_FORMATS, DataError, ReadReport,
                      detect_format, read_collection, read_conversations, read_qrels, read_run, read_training,
                      write_qrels, write_run)
from .readers import COLLECTION_FORMATS, QRELS_FORMATS
from .records import ASSISTANT, USER, CSITExample, EvalTurn, Passage, TrainingExample, Turn
from .sequences import SequenceFormatter
from .summary_tokens import SummaryTokens, add_summary_tokens

__all__ = ["ASSISTANT", "USER", "EvalTurn", "Passage", "TrainingExample", "Turn", "CSITExample", "SequenceFormatter", "SummaryTokens",
           "add_summary_tokens", "DataError", "ReadReport", "MAX_REPORTED_ERRORS", "FORMATS", "TRAINING_FORMATS",
           "CONVERSATION_FORMATS", "detect_format", "read_training", "read_conversations", "read_collection",
           "read_qrels", "read_run", "write_run", "write_qrels", "COLLECTION_FORMATS", "QRELS_FORMATS"]
