"""OpenAI requests to what a replica runs: token ids, sampling values and the request's shape.

Runs in the ingress, as vLLM's API server tokenizes apart from its engine: on the GPU replica
the tokenizer would compete for the GIL with the engine thread (an 8k-token prompt costs ~6 ms
of tokenizing). The tokenizer's batch entry points release the GIL, so tokenizing a long prompt
in a worker thread leaves the ingress's event loop serving other streams meanwhile; a short
one (`INLINE_CHARS`) is tokenized on the loop, where the thread's hand-off would cost more.
The exact token count then shapes the request once (admission.py) for the router and the
replica. A returning user's prompt is tokenized from where its previous one ended
(prompt_tokens.py). A chat's tools and tool turns are rendered by the model's template, and a
`tool_choice` that forces a call ends the prompt with that call's opening (tool_choice.py).
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from deployments.admission import AdmissionError, RequestShape, shape_request
from deployments.auth import tenant_of
from deployments.chat_template import ChatTemplateError
from deployments.errors import APIError
from deployments.identity import user_key
from deployments.prompt_tokens import PromptTokens
from deployments.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _SamplingFields,
)
from deployments.token_bound import fewest_tokens, max_bytes_per_token
from deployments.tokenizer import TextTokenizer
from deployments.tool_calls import ParserName
from deployments.tool_choice import ToolPlan, plan_tools

# Characters of a completion prompt tokenized on the event loop rather than in a worker
# thread: the thread's hand-off (a wake-up each way) cost ~0.2-0.8 ms of the first token on 2
# shared cores, more than tokenizing this much (a 512-token prompt is ~2-3k characters, ~0.5
# ms; a returning user's new tail is shorter); longer texts still leave the loop free.
INLINE_CHARS = 4096


@dataclass(frozen=True)
class Prepared:
    """A request ready for a replica, and what the ingress keeps to turn tokens into text."""

    payload: dict[str, Any]  # LLMReplica.generate's `request`: token ids and sampling values
    shape: RequestShape
    stop: tuple[str, ...]
    min_tokens: int
    tools: ToolPlan | None = None  # how the answer is read for tool calls (chat only)


def template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (transformers' convention): text content, and a
    call's arguments as an object, not OpenAI's JSON text (templates write `arguments|tojson`)."""
    out: dict[str, Any] = {
        "role": message.role,
        "content": message.text(),
        "name": message.name,
        "tool_call_id": message.tool_call_id,
    }
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments(
                        call.function.arguments,
                        f"messages.{index}.tool_calls.{j}.function.arguments",
                    ),
                },
            }
            for j, call in enumerate(message.tool_calls)
        ]
    return out


def _arguments(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise APIError(
            400,
            f"{param}: must be a JSON object as text",
            param="messages",
            code="invalid_tool_call",
        )
    return value


class PromptBuilder:
    """Tokenizes and shapes requests for one model."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        default_max_tokens: int,
        max_messages: int,
        tool_parser: ParserName | None = None,
        user_secret: bytes = b"",
    ) -> None:
        """`user_secret` keys the user hashes (identity.user_key)."""
        self.tokenizer = tokenizer
        self.tokens = PromptTokens(tokenizer)
        self.user_secret = user_secret
        self.default_max_tokens = default_max_tokens
        self.max_messages = max_messages
        self.tool_parser = tool_parser  # the model's tool-call format; None: it has none
        # At most this many bytes of text a token (None: no certain bound): text too long
        # for the context even so is refused before it costs seconds of tokenizing.
        self.bytes_per_token = max_bytes_per_token(tokenizer.backend_tokenizer)

    async def chat(self, req: ChatCompletionRequest, user: str | None, context: int) -> Prepared:
        if len(req.messages) > self.max_messages:
            raise APIError(
                400,
                f"messages: at most {self.max_messages} messages per request, "
                f"got {len(req.messages)}",
                param="messages",
                code="too_many_messages",
            )
        plan = plan_tools(req, self.tool_parser)
        messages = [template_message(i, m) for i, m in enumerate(req.messages)]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        self._check_length([m["content"] or "" for m in messages], context, "messages")
        try:
            ids = await asyncio.to_thread(
                self._encode_chat, user, messages, tools, plan.forced if plan else ""
            )
        except ChatTemplateError as exc:
            raise APIError(400, f"messages: {exc}", param="messages", code="invalid_chat") from None
        prepared = self._prepared(req, ids, req.token_limit, user, context, "messages")
        return dataclasses.replace(prepared, tools=plan)

    async def completion(self, req: CompletionRequest, user: str | None, context: int) -> Prepared:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]
            vocab = self.tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            text = prompt if isinstance(prompt, str) else prompt[0]
            self._check_length([text], context, "prompt")
            ids = await self._encode(user, text)
        return self._prepared(req, ids, req.max_tokens, user, context, "prompt")

    async def _encode(self, user: str | None, text: str) -> array.array:
        """A completion prompt's ids (with the tokenizer's special tokens): on this event loop
        when at most INLINE_CHARS of it are to be tokenized, else in a worker thread."""
        if self.tokens.chars_to_encode(user, text, True) <= INLINE_CHARS:
            return self.tokens.encode(user, text, True)
        return await asyncio.to_thread(self.tokens.encode, user, text, True)

    def _check_length(self, texts: list[str], context: int, param: str) -> None:
        """Refuse text that no tokenization fits in the context, before tokenizing it."""
        size = sum(len(text.encode("utf-8")) for text in texts)
        least = fewest_tokens(size, self.bytes_per_token)
        if least >= context:
            raise APIError(
                400,
                f"the prompt's text is {size} bytes: at least {least} tokens, "
                f"but this model's context is {context} tokens",
                param=param,
                code="context_length_exceeded",
            )

    def _encode_chat(
        self,
        user: str | None,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        answer_prefix: str = "",
    ) -> array.array:
        """The rendered chat's ids (the template writes its own special tokens), then those of
        `answer_prefix`: the start of the answer, which the model continues."""
        text = self.tokenizer.render_chat(messages, tools) + answer_prefix
        return self.tokens.encode(user, text, False)

    def _prepared(
        self,
        req: _SamplingFields,
        ids: list[int] | array.array,
        max_tokens: int | None,
        user: str | None,
        context: int,
        param: str,
    ) -> Prepared:
        try:
            shape = shape_request(
                user_key(user, self.user_secret) if user else None,
                len(ids),
                max_tokens or self.default_max_tokens,
                context,
                param,
                req.token_limit_param,
                tenant_of(user),
            )
        except AdmissionError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        sampling = {k: v for k, v in req.sampling(shape.max_tokens).items() if k != "stop"}
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= token < vocab for token, _ in sampling["logit_bias"]):
            raise APIError(
                400, f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias"
            )
        sampling["min_tokens"] = min(sampling["min_tokens"], shape.max_tokens)
        # Token ids travel as one packed buffer: an 8k-token list of Python ints cost ~1 ms
        # to pickle and unpickle on the way to the replica, the array a few microseconds.
        packed = ids if isinstance(ids, array.array) else array.array("I", ids)
        return Prepared(
            {"prompt_token_ids": packed, "sampling": sampling},
            shape,
            tuple(req.stop_list()),
            sampling["min_tokens"],
        )
