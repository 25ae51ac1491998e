"""Chat templates rendered as transformers renders them, with jinja2 alone (no torch).

The environment is transformers' (utils/chat_template_utils.py, 5.x): an immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and a `{% generation %}` tag
(rendered as its body), a `tojson` filter that does not escape HTML and keeps non-ASCII text,
and the globals `raise_exception`, `strftime_now`, `dict` and a `namespace` that refuses
underscore names. Inputs are rebuilt from plain JSON types before the template sees them,
keys whose value is None are dropped from messages, and a message's reasoning is offered under
`reasoning_content` and `thinking`, as transformers does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat that cannot be rendered: bad messages, or the template itself refused it."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text; rendered as its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja's Extension API

    def parse(self, parser: Any) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without the type's other attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore-prefixed names (no reach into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: `self` in args
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by source)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env.from_string(source)


def plain(value: Any) -> Any:
    """`value` rebuilt from JSON types (pydantic models and dataclasses as dicts); anything
    else becomes an inert "<TypeName>" string, so the sandbox never sees rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums...) back to the base type, bypassing
        return str.__str__(value)  # any overridden conversion
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return plain(value.item())  # a numpy scalar (np.bool_ would be a truthy placeholder)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts without None values, reasoning under both names templates read."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ChatTemplateError("a chat needs at least one message")
    out = []
    for message in plain(list(messages)):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be objects, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next(
            (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(
    source: str,
    messages: Any,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """Render `source` for a chat; `variables` (special tokens, template options) are passed
    as template variables. Raises ChatTemplateError for bad input or a template's refusal."""
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ChatTemplateError("tools must be JSON schemas (objects)")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise ChatTemplateError("documents must be objects with 'title' and 'text'")
    chat = normalize_messages(messages)
    try:
        return compile_template(source).render(
            messages=chat,
            tools=plain(tools),
            documents=plain(documents),
            add_generation_prompt=add_generation_prompt,
            **plain(variables),
        )
    except (jinja2.exceptions.TemplateError, TypeError, ValueError) as exc:
        # Templates compute on the client's data (concatenate, index, trim): its mistakes.
        raise ChatTemplateError(f"the chat template refused this chat: {exc}") from exc
