"""Tool calls in a model's output: the formats chat templates teach, parsed into OpenAI's shape.

Two formats, named as vLLM names its parsers (`--tool-call-parser`):

- ``hermes`` (Qwen2/2.5/3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>``, any number of them, with free text before.
- ``llama3_json`` (Llama 3.1-3.3): the whole answer is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several calls separated by ``;``.

`ToolCallStream` reads text as it arrives and splits it into content and finished calls; text
that may belong to a call is held back until it is known. A call is only ever emitted whole
(its name, then all of its arguments): the streamed argument string is one delta, which OpenAI
clients concatenate like any other. Imports nothing of ours.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

ParserName = Literal["hermes", "llama3_json"]
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """One function call: `arguments` is a JSON object as text (OpenAI sends it so)."""

    name: str
    arguments: str
    id: str = ""

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_from(obj: Any) -> ToolCall | None:
    """A call from a decoded JSON object: `name` and an object under `arguments` or
    `parameters` (Llama's name); anything else is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


def parse_llama3_json(text: str) -> list[ToolCall] | None:
    """Calls of a whole Llama 3 answer, or None when it is not (only) calls."""
    text = text.strip()
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG) :].lstrip()
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        call = _call_from(obj)
        if call is None:
            return None
        calls.append(call)
        rest = text[at:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        at = len(text) - len(rest)
    return calls or None


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def parse_hermes_body(body: str) -> ToolCall | None:
    """The call inside one `<tool_call>...</tool_call>` pair."""
    try:
        return _call_from(json.loads(body))
    except json.JSONDecodeError:
        return None


def forced_prefix(parser: ParserName, name: str | None) -> str:
    """The text a `tool_choice` of `required` (name None) or a named function puts at the
    start of the answer: the model continues inside a call in its own format. `name` is a
    validated function name (letters, digits, `_`, `-`), so it needs no JSON escaping."""
    opening = '{"name": "' if parser == "llama3_json" else HERMES_OPEN + '\n{"name": "'
    if name is None:
        return opening
    return opening + name + ('", "parameters": ' if parser == "llama3_json" else '", "arguments": ')


def detect_parser(template: str | None) -> ParserName | None:
    """The format a chat template teaches, as vLLM's users would pick it: `<tool_call>` tags
    (Qwen, Hermes) or Llama 3's JSON with `"parameters"`; None: the template shows none."""
    if not template:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or '"parameters": ' in template:
        return "llama3_json"
    return None


class ToolCallStream:
    """Splits streamed text into content and calls for one answer.

    `feed(text)` and `finish()` return items: ``("content", str)`` or ``("call", ToolCall)``.
    Invariant: content items, concatenated, plus the calls' source text, are exactly the text
    fed (for hermes, tags included in the calls' source); nothing is dropped but whitespace
    between calls.
    """

    def __init__(self, parser: ParserName) -> None:
        self.parser = parser
        self._held = ""  # text not yet known to be content or a call
        self._in_call = False  # hermes: inside <tool_call>; llama: the answer is JSON
        self._started = False  # llama: the first non-space character was seen
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._held += text
        return self._hermes(final=False) if self.parser == "hermes" else self._llama(False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._hermes(final=True) if self.parser == "hermes" else self._llama(True)

    def _call(self, call: ToolCall) -> tuple[str, Any]:
        self.calls += 1
        return ("call", call)

    def _llama(self, final: bool) -> list[tuple[str, Any]]:
        if not self._started:
            stripped = self._held.lstrip()
            if not stripped:
                return []
            self._started = True
            self._in_call = stripped[0] == "{" or stripped.startswith(PYTHON_TAG[: len(stripped)])
        if not self._in_call:
            out, self._held = self._held, ""
            return [("content", out)] if out else []
        if not final:
            return []
        text, self._held = self._held, ""
        calls = parse_llama3_json(text)
        if calls is None:
            return [("content", text)]
        return [self._call(c) for c in calls]

    def _hermes(self, final: bool) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        while True:
            if self._in_call:
                end = self._held.find(HERMES_CLOSE)
                if end < 0:
                    if final:  # the answer ended inside a call: parse what there is
                        call = parse_hermes_body(self._held)
                        out.append(
                            self._call(call) if call else ("content", HERMES_OPEN + self._held)
                        )
                        self._held = ""
                    return out
                body = self._held[:end]
                self._held = self._held[end + len(HERMES_CLOSE) :]
                self._in_call = False
                call = parse_hermes_body(body)
                if call:
                    self._held = self._held.lstrip()  # the newline between calls
                out.append(
                    self._call(call) if call else ("content", HERMES_OPEN + body + HERMES_CLOSE)
                )
                continue
            start = self._held.find(HERMES_OPEN)
            if start >= 0:
                before = self._held[:start]
                if before.strip() or (before and not self.calls):
                    out.append(("content", before))
                self._held, self._in_call = self._held[start + len(HERMES_OPEN) :], True
                continue
            keep = 0 if final else _partial_suffix(self._held, HERMES_OPEN)
            text, self._held = (
                self._held[: len(self._held) - keep],
                self._held[len(self._held) - keep :],
            )
            if text and (text.strip() or not self.calls):
                out.append(("content", text))
            return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a start of `tag` (held back: it may be)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
