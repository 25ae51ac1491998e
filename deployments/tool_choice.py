"""`tool_choice` for one chat request: what its prompt ends with and how its answer is read.

- `none` (or no tools): tools still reach the chat template, as vLLM does by default; the answer
  is plain content.
- `auto`: the answer is parsed; calls found become `tool_calls` with finish reason `tool_calls`.
- `required` / a named function: the answer is made to start inside a call in the model's own
  format (the prompt ends with `{"name": "` or `{"name": "NAME", "arguments": `, see
  tool_calls.forced_prefix), and it must parse as calls of the declared tools (of the named
  one); a model that does not comply gets a 500 `tool_call_not_produced`, never a silent
  content answer. vLLM instead constrains the output with its structured-output grammar; once
  the grammar-constrained sampler lands, the same prefix plus a JSON-schema constraint on the
  arguments makes compliance certain.

`tool_events` rewrites a replica's event stream (see streaming.py): text deltas become content
deltas and `tool_call` events. Imports `tool_calls`, `protocol` and `errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deployments.errors import APIError
from deployments.protocol import ChatCompletionRequest, NamedToolChoice
from deployments.tool_calls import ParserName, ToolCallStream, forced_prefix

Messages = AsyncIterator[list[dict[str, Any]]]


@dataclass(frozen=True)
class ToolPlan:
    """How one request's answer is read (absent when tool_choice is none)."""

    parser: ParserName
    mode: str  # "auto", "required" or "named"
    names: frozenset[str]  # the declared functions; for "named" only the chosen one
    forced: str  # text the answer starts with: put at the prompt's end, read before the answer
    parallel: bool  # False: calls after the first are dropped

    @property
    def must_call(self) -> bool:
        return self.mode in ("required", "named")


def plan_tools(req: ChatCompletionRequest, parser: ParserName | None) -> ToolPlan | None:
    """The request's plan; a 400 naming `tool_choice` when the model has no call format."""
    mode = req.tool_mode
    if mode == "none":
        return None
    if parser is None:
        raise APIError(
            400,
            f"tool_choice: {mode!r} needs a tool-call format, and this model's "
            "chat template shows none; send tool_choice 'none', or set "
            "model.tool_call_parser",
            param="tool_choice",
            code="unsupported_parameter",
        )
    names = frozenset(t.function.name for t in req.tools or [])
    named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    return ToolPlan(
        parser,
        mode,
        frozenset({named}) if named else names,
        forced_prefix(parser, named) if mode != "auto" else "",
        req.parallel_tool_calls,
    )


def _not_produced(plan: ToolPlan, why: str) -> dict[str, Any]:
    return {
        "event": "error",
        "status": 500,
        "type": "server_error",
        "param": None,
        "code": "tool_call_not_produced",
        "message": f"tool_choice {plan.mode!r}: the model's answer was not a call of "
        f"{sorted(plan.names)} ({why})",
    }


class _Reader:
    """One answer's text through a ToolCallStream, as events."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.stream = ToolCallStream(plan.parser)
        self.calls = 0
        self.wrong: str | None = None  # why a forced answer fails
        self._fed = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not self._fed:
            text, self._fed = self.plan.forced + text, True
        return self._events(self.stream.feed(text))

    def finish(self) -> list[dict[str, Any]]:
        return self.feed("") + self._events(self.stream.finish())

    def _events(self, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for kind, value in items:
            if kind == "content":
                if self.plan.must_call:
                    if value.strip():
                        self.wrong = self.wrong or "it did not parse as a call"
                    continue
                out.append({"event": "delta", "text": value})
                continue
            if self.plan.must_call and value.name not in self.plan.names:
                self.wrong = self.wrong or f"it called {value.name!r}"
                continue
            if self.calls and not self.plan.parallel:
                continue  # parallel_tool_calls false: one call an answer
            out.append({"event": "tool_call", "index": self.calls, "call": value.openai()})
            self.calls += 1
        return out


async def tool_events(messages: Messages, plan: ToolPlan) -> Messages:
    """`messages` with the answer's text read as content and tool calls; the end event's
    finish reason becomes `tool_calls` when the model stopped after calling; a forced call
    the model did not make ends the stream with an error event instead."""
    reader = _Reader(plan)
    async for message in messages:
        out: list[dict[str, Any]] = []
        for event in message:
            kind = event["event"]
            if kind == "delta":
                out.extend(reader.feed(event["text"]))
            elif kind == "end":
                out.extend(reader.finish())
                if plan.must_call and (reader.wrong or not reader.calls):
                    out.append(_not_produced(plan, reader.wrong or "no call was made"))
                    continue
                if reader.calls and event["finish_reason"] == "stop":
                    event = {**event, "finish_reason": "tool_calls"}
                out.append(event)
            else:
                out.append(event)
        if out:
            yield out
