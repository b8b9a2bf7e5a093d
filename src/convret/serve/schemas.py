"""Request and answer bodies of ``convret serve`` (pydantic; they make the OpenAPI schema at ``/openapi.json``).

Unknown fields are refused (422). Texts must be valid Unicode (a JSON ``\\ud800`` escape, a lone surrogate, is
refused: no tokenizer can encode it).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["TurnIn", "SearchIn", "SessionIn", "PassageIn", "EncodeIn", "Encoding", "Hit", "SearchOut", "EncodeOut",
           "HealthOut", "ErrorOut", "ValidationErrorOut", "CONVERSATION_ID"]

CONVERSATION_ID = r"^[A-Za-z0-9._:@+=-]{1,128}$"
_CONVERSATION_ID_DOC = "the cache key of the conversation: 1-128 of [A-Za-z0-9._:@+=-]; without it nothing is cached"


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode (a lone surrogate at character {error.start})") from None
    return value


class TurnIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    text: str

    @field_validator("role", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        # "User" / "ASSISTANT" as every convret reader accepts them
        return value.lower() if isinstance(value, str) else value

    @field_validator("text")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty text")
        return _unicode(value)


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversation_id: str | None = Field(None, pattern=CONVERSATION_ID, description=_CONVERSATION_ID_DOC)
    turns: list[TurnIn] = Field(..., min_length=1, description="the session, oldest first; the last turn is the "
                                                               "user's query")
    top_k: int = Field(10, ge=1, description="passages to return (at most the server's max_top_k)")


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversation_id: str | None = Field(None, pattern=CONVERSATION_ID, description=_CONVERSATION_ID_DOC)
    turns: list[TurnIn] = Field(..., min_length=1)


class PassageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    title: str | None = None

    @field_validator("text", "title")
    @classmethod
    def _valid(cls, value: str | None) -> str | None:
        return value if value is None else _unicode(value)


class EncodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sessions: list[SessionIn] = Field(default_factory=list)
    passages: list[PassageIn] = Field(default_factory=list)


class Encoding(BaseModel):
    reused_tokens: int
    computed_tokens: int
    total_tokens: int
    cache: Literal["hit", "miss", "changed", "none"]


class Hit(BaseModel):
    id: str
    score: float
    text: str
    title: str


class SearchOut(BaseModel):
    conversation_id: str | None
    results: list[Hit]
    encoding: Encoding


class EncodeOut(BaseModel):
    dim: int
    sessions: list[list[float]]
    passages: list[list[float]]
    encodings: list[Encoding]


class CacheHealth(BaseModel):
    bytes: int
    budget_bytes: int
    conversations: int


class AdmissionHealth(BaseModel):
    admitted_requests: int
    max_concurrent_requests: int
    queued_tokens: int
    max_queued_tokens: int


class HealthOut(BaseModel):
    """``status`` for anyone; the rest only to an authenticated caller (or on a server without keys). Never a
    path."""

    status: Literal["ok"]
    passages: int | None = None
    dim: int | None = None
    cache: CacheHealth | None = None
    admission: AdmissionHealth | None = None


class ErrorOut(BaseModel):
    detail: str


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: list[ErrorItem]
