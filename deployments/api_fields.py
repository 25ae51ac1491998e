"""Which request fields the API refuses, and the one check that refuses them.

Every field of OpenAI's chat and completions request schemas is honoured or refused; a field
OpenAI does not define is refused too (vLLM ignores such fields with a log line; we answer 400
so that a typo such as `max_token` or a feature we lack never passes silently as a 200).
A refusal is a 400 with code `unsupported_parameter` and `param` naming the field. A refused
field is accepted at the values that ask for nothing (`n: 1`, `store: false`, `null`), as
OpenAI's own defaults are. Imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic_core import PydanticCustomError

Endpoint = Literal["chat", "completion"]
UNSUPPORTED = "unsupported_parameter"


def _absent(value: Any) -> bool:
    return value is None


def _one(value: Any) -> bool:
    return value is None or value == 1


def _false(value: Any) -> bool:
    return value is None or value is False


# field -> (the values that ask for nothing, why other values are refused)
Rule = tuple[Callable[[Any], bool], str]
_COMMON: dict[str, Rule] = {
    "n": (_one, "only one choice per request (n=1) is supported"),
}
_CHAT: dict[str, Rule] = {
    "audio": (_absent, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output is supported"),
    "prediction": (_absent, "predicted outputs are not supported"),
    "web_search_options": (_absent, "web search is not supported"),
    "store": (_false, "stored completions are not supported"),
    "metadata": (lambda v: not v, "metadata is for stored completions, which are not supported"),
    "service_tier": (
        lambda v: v in (None, "auto", "default"),
        "only the default service tier exists here",
    ),
    "reasoning_effort": (_absent, "reasoning effort is not supported"),
    "verbosity": (_absent, "verbosity is not supported"),
    "prompt_cache_key": (_absent, "use the X-User-Id header or `user` to keep a KV cache"),
    "safety_identifier": (_absent, "safety identifiers are not supported"),
    "functions": (_absent, "`functions` is deprecated; use `tools`"),
    "function_call": (_absent, "`function_call` is deprecated; use `tool_choice`"),
}
_COMPLETION: dict[str, Rule] = {
    "best_of": (_one, "best_of > 1 is not supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "echo": (_false, "echo is not supported"),
}
_STREAM_OPTIONS: dict[str, Rule] = {
    "include_obfuscation": (_false, "stream obfuscation is not supported"),
}


def refused(endpoint: Endpoint) -> dict[str, Rule]:
    """The refused fields of an endpoint and their rules (for docs and tests)."""
    return {**_COMMON, **(_CHAT if endpoint == "chat" else _COMPLETION)}


def _refuse(param: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(
        UNSUPPORTED, "{param}: {reason}", {"param": param, "reason": message}
    )


def refuse_fields(data: Any, known: set[str], endpoint: Endpoint) -> Any:
    """`data` (a request body) unchanged, or a PydanticCustomError of type
    `unsupported_parameter` (its context names the field) for the first field that is refused
    at its value or that no model field or refusal rule knows."""
    if not isinstance(data, dict):
        return data  # pydantic reports the wrong type itself
    rules = refused(endpoint)
    for name, value in data.items():
        rule = rules.get(name)
        if rule is not None:
            ok, why = rule
            if not ok(value):
                raise _refuse(name, why)
        elif name not in known:
            raise _refuse(str(name)[:64], "unknown parameter")
    options = data.get("stream_options")
    if isinstance(options, dict):
        for name, (ok, why) in _STREAM_OPTIONS.items():
            if not ok(options.get(name)):
                raise _refuse(f"stream_options.{name}", why)
    return data
