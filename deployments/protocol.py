"""OpenAI-compatible request and response models (the HTTP edge).

Requests are validated here so a client's mistake becomes a 400 naming the field; unknown extra
fields that OpenAI clients send are accepted and ignored. Imports nothing else of ours.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20  # top logprobs a token may ask for (OpenAI's and vLLM's limit)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaSpec(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema.schema")
        return self

    def constraint(self) -> str | None:
        """What the engine constrains output by (JSON text), or None for free text."""
        if self.type == "text":
            return None
        out: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = {"schema": self.json_schema.schema_}
        return json.dumps(out)


class _SamplingFields(_Request):
    model: str = Field(..., min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's extensions, for controlled lengths (benchmarks, tests):
    ignore_eos: bool = Field(
        False, description="Keep generating past end-of-sequence tokens up to max_tokens.")
    min_tokens: int = Field(
        0, ge=0, description="End-of-sequence tokens and stop strings count only after this "
        "many tokens.")
    # Logit rules, applied to the sampled rows on the GPU (engine/paged/logits_rules.py):
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = Field(
        None, gt=0, description="vLLM's extension: seen tokens' logits divided by this.")
    top_k: int | None = Field(None, ge=-1, description="vLLM's extension; 0 or -1: off.")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM's extension.")
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys are token ids; got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100]; got {value}")
        return bias

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list):
            if len(stop) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
            if any(s == "" for s in stop):
                raise ValueError("stop sequences must not be empty")
        elif stop == "":
            raise ValueError("stop sequences must not be empty")
        return stop

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """The sampling settings the replica takes, as plain data."""
        return {
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "stop": self.stop_list(),
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "logprobs": self.logprob_count(),
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": (1.0 if self.repetition_penalty is None
                                   else self.repetition_penalty),
            "logit_bias": [[int(k), v] for k, v in (self.logit_bias or {}).items()],
            "top_k": max(0, self.top_k or 0),
            "min_p": self.min_p or 0.0,
            "response_format": self.response_format.constraint() if self.response_format
            else None,
        }

    def logprob_count(self) -> int | None:
        """How many top logprobs each token carries (0: only its own); None: no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] = Field(...)
    max_tokens: int | None = Field(16, gt=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprob_count(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _single_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise ValueError("only one prompt per request is supported")
        if self.echo:
            raise ValueError("echo is not supported")
        return self


# ---- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _response(rid: str, kind: str, model: str, choice: dict[str, Any] | None,
              usage: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's envelope around at most one choice (index 0); None gives no choices. A
    choice without `logprobs` gets null there."""
    out: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def chat_completion(
    rid: str, model: str, text: str, finish_reason: str | None, usage: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return _response(rid, "chat.completion", model, {
        "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
        "logprobs": logprobs,
    }, usage)


def chat_chunk(
    rid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
    usage: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed chat chunk; `delta=None` gives the usage-only chunk (no choices)."""
    choice = None if delta is None else {"delta": delta, "finish_reason": finish_reason,
                                         "logprobs": logprobs}
    return _response(rid, "chat.completion.chunk", model, choice, usage)


def text_completion(
    rid: str, model: str, text: str, finish_reason: str | None, usage: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return _response(rid, "text_completion", model,
                     {"text": text, "finish_reason": finish_reason, "logprobs": logprobs}, usage)


def completion_chunk(
    rid: str, model: str, text: str | None, finish_reason: str | None = None,
    usage: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed completion chunk; `text=None` gives the usage-only chunk (no choices)."""
    choice = None if text is None else {"text": text, "finish_reason": finish_reason,
                                        "logprobs": logprobs}
    return _response(rid, "text_completion", model, choice, usage)


def error_body(
    message: str, err_type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def model_list(name: str, max_model_len: int | None) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": name, "object": "model", "created": 0, "owned_by": "grace-serve",
    }
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return {"object": "list", "data": [card]}
