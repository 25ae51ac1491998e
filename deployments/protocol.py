"""OpenAI-compatible request and response models (the HTTP edge).

Requests are validated here so a client's mistake becomes a 400 naming the field; unknown extra
fields that OpenAI clients send are accepted and ignored. Imports nothing else of ours.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="after")
    def _utf8_text(self) -> Any:
        """Every string must be encodable as UTF-8: JSON's `\\ud800` escapes decode to lone
        surrogates, which no tokenizer takes (nested models check their own fields)."""
        for name, value in self:
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and not _is_utf8(text):
                    raise ValueError(f"{name}: the text is not valid Unicode (it holds a lone "
                                     "surrogate, e.g. an unpaired \\ud800 escape)")
        return self


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


class _SamplingFields(_Request):
    model: str = Field(..., min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: StrictInt | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's extensions, for controlled lengths (benchmarks, tests):
    ignore_eos: bool = Field(
        False, description="Keep generating past end-of-sequence tokens up to max_tokens.")
    min_tokens: StrictInt = Field(
        0, ge=0, description="End-of-sequence tokens and stop strings count only after this "
        "many tokens.")

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
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, gt=0)  # strict: `true` is not 1
    max_completion_tokens: StrictInt | None = Field(None, gt=0)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[StrictInt] = Field(...)
    max_tokens: StrictInt | None = Field(16, gt=0)
    echo: bool = False

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
    """OpenAI's envelope around at most one choice (index 0); None gives no choices."""
    out: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [] if choice is None else [{"index": 0, **choice, "logprobs": None}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def chat_completion(
    rid: str, model: str, text: str, finish_reason: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    return _response(rid, "chat.completion", model, {
        "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
    }, usage)


def chat_chunk(
    rid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed chat chunk; `delta=None` gives the usage-only chunk (no choices)."""
    choice = None if delta is None else {"delta": delta, "finish_reason": finish_reason}
    return _response(rid, "chat.completion.chunk", model, choice, usage)


def text_completion(
    rid: str, model: str, text: str, finish_reason: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    return _response(rid, "text_completion", model,
                     {"text": text, "finish_reason": finish_reason}, usage)


def completion_chunk(
    rid: str, model: str, text: str | None, finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed completion chunk; `text=None` gives the usage-only chunk (no choices)."""
    choice = None if text is None else {"text": text, "finish_reason": finish_reason}
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
