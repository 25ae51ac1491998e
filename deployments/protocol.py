"""OpenAI-compatible request and response models (the HTTP edge).

Requests are validated here so a client's mistake becomes a 400 naming the field. Every field
of OpenAI's request schemas is either honoured or refused with a 400 `unsupported_parameter`
naming it, and so is any field OpenAI does not define (api_fields.py holds those tables).
Imports only `api_fields`, a table of names that imports nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from deployments.api_fields import Endpoint, refuse_fields

MAX_STOP_SEQUENCES = 4
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


def invalid(param: str, message: str) -> PydanticCustomError:
    """A request-level validation error that names its field (errors.py reads `param`)."""
    return PydanticCustomError(
        "value_error", "{param}: {reason}", {"param": param, "reason": message}
    )


MAX_LOGPROBS = 20  # top logprobs a token may ask for (OpenAI's and vLLM's limit)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="after")
    def _utf8_text(self) -> Any:
        """Every string must be encodable as UTF-8: JSON's `\\ud800` escapes decode to lone
        surrogates, which no tokenizer takes (nested models check their own fields)."""
        for name, value in self:
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and not _is_utf8(text):
                    raise ValueError(
                        f"{name}: the text is not valid Unicode (it holds a lone "
                        "surrogate, e.g. an unpaired \\ud800 escape)"
                    )
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


class FunctionCall(_Request):
    name: str = Field(..., pattern=FUNCTION_NAME)
    arguments: str = Field(..., description="The call's arguments: a JSON object as text.")


class MessageToolCall(_Request):
    """A call an earlier assistant turn made (OpenAI's `tool_calls[]` in the history)."""

    id: str = Field(..., min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns only
    tool_call_id: str | None = Field(None, max_length=256)  # tool turns: the call answered

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool messages need the tool_call_id they answer")
        return self

    def text(self) -> str:
        """The message's content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class FunctionDefinition(_Request):
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, shown to the model as given
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str = Field(..., pattern=FUNCTION_NAME)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


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
    ENDPOINT: ClassVar[Endpoint]
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
        False, description="Keep generating past end-of-sequence tokens up to max_tokens."
    )
    min_tokens: StrictInt = Field(
        0,
        ge=0,
        description="End-of-sequence tokens and stop strings count only after this many tokens.",
    )
    # Logit rules, applied to the sampled rows on the GPU (engine/paged/logits_rules.py):
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = Field(
        None, gt=0, description="vLLM's extension: seen tokens' logits divided by this."
    )
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

    @model_validator(mode="before")
    @classmethod
    def _supported_fields(cls, data: Any) -> Any:
        return refuse_fields(data, set(cls.model_fields), cls.ENDPOINT)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "only allowed when stream is true")
        return self

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
            "repetition_penalty": (
                1.0 if self.repetition_penalty is None else self.repetition_penalty
            ),
            "logit_bias": [[int(k), v] for k, v in (self.logit_bias or {}).items()],
            "top_k": max(0, self.top_k or 0),
            "min_p": self.min_p or 0.0,
            "response_format": self.response_format.constraint() if self.response_format else None,
        }

    def logprob_count(self) -> int | None:
        """How many top logprobs each token carries (0: only its own); None: no logprobs."""
        return None

    @property
    def token_limit_param(self) -> str | None:
        """The field the client set the completion length with (None: the server's default)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    ENDPOINT = "chat"
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, gt=0)  # strict: `true` is not 1
    max_completion_tokens: StrictInt | None = Field(None, gt=0)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = Field(True, description="False: at most one call an answer.")
    logprobs: bool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def token_limit_param(self) -> str | None:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens" if self.max_tokens is not None else None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice is not None and not self.tools:
            raise invalid("tool_choice", "only allowed when tools are given")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise invalid("tools", "function names must be unique")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise invalid(
                "tool_choice", f"names {choice.function.name!r}, which is not among tools"
            )
        return self

    @property
    def tool_mode(self) -> str:
        """none / auto / required / named: what the answer may or must be (OpenAI's default
        is auto when tools are given)."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class CompletionRequest(_SamplingFields):
    ENDPOINT = "completion"
    prompt: str | list[str] | list[StrictInt] = Field(...)
    max_tokens: StrictInt | None = Field(16, gt=0)
    echo: bool = False  # true is refused (api_fields.py)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def token_limit_param(self) -> str | None:
        explicit = "max_tokens" in self.model_fields_set and self.max_tokens is not None
        return "max_tokens" if explicit else None  # not OpenAI's default of 16

    def logprob_count(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _single_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise ValueError("only one prompt per request is supported")
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


def _response(
    rid: str, kind: str, model: str, choice: dict[str, Any] | None, usage: dict[str, Any] | None
) -> dict[str, Any]:
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
    rid: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, Any],
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A chat answer; with `tool_calls`, content is None unless the model also wrote text."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": text.strip() or None, "tool_calls": tool_calls}
    return _response(
        rid,
        "chat.completion",
        model,
        {
            "message": message,
            "finish_reason": finish_reason,
            "logprobs": logprobs,
        },
        usage,
    )


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed chat chunk; `delta=None` gives the usage-only chunk (no choices)."""
    choice = (
        None
        if delta is None
        else {"delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    )
    return _response(rid, "chat.completion.chunk", model, choice, usage)


def text_completion(
    rid: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return _response(
        rid,
        "text_completion",
        model,
        {"text": text, "finish_reason": finish_reason, "logprobs": logprobs},
        usage,
    )


def completion_chunk(
    rid: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed completion chunk; `text=None` gives the usage-only chunk (no choices)."""
    choice = (
        None
        if text is None
        else {"text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    )
    return _response(rid, "text_completion", model, choice, usage)


def error_body(
    message: str,
    err_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def model_card(name: str, max_model_len: int | None) -> dict[str, Any]:
    """OpenAI's model object (GET /v1/models/{id}), with vLLM's `max_model_len` when known."""
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "grace-serve",
    }
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def model_list(name: str, max_model_len: int | None) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, max_model_len)]}
