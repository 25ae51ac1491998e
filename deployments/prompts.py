"""OpenAI requests to what a replica runs: token ids, sampling values and the request's shape.

Runs in the ingress, as vLLM's API server tokenizes apart from its engine: on the GPU replica
the tokenizer would compete for the GIL with the engine thread (an 8k-token prompt costs ~6 ms
of tokenizing). The tokenizer's batch entry points release the GIL, so tokenizing in a worker
thread leaves the ingress's event loop serving other streams meanwhile. The exact token count
then shapes the request once (admission.py) for the router and the replica.
"""

from __future__ import annotations

import array
import asyncio
from dataclasses import dataclass
from typing import Any

from deployments.admission import AdmissionError, RequestShape, shape_request
from deployments.chat_template import ChatTemplateError
from deployments.errors import APIError
from deployments.identity import user_key
from deployments.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from deployments.tokenizer import TextTokenizer


@dataclass(frozen=True)
class Prepared:
    """A request ready for a replica, and what the ingress keeps to turn tokens into text."""

    payload: dict[str, Any]  # LLMReplica.generate's `request`: token ids and sampling values
    shape: RequestShape
    stop: tuple[str, ...]
    min_tokens: int


class PromptBuilder:
    """Tokenizes and shapes requests for one model."""

    def __init__(self, tokenizer: TextTokenizer, default_max_tokens: int,
                 max_messages: int) -> None:
        self.tokenizer = tokenizer
        self.default_max_tokens = default_max_tokens
        self.max_messages = max_messages

    async def chat(self, req: ChatCompletionRequest, user: str | None, context: int
                   ) -> Prepared:
        if len(req.messages) > self.max_messages:
            raise APIError(400, f"messages: at most {self.max_messages} messages per request, "
                           f"got {len(req.messages)}", param="messages", code="too_many_messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        except ChatTemplateError as exc:
            raise APIError(400, f"messages: {exc}", param="messages",
                           code="invalid_chat") from None
        return self._prepared(req, ids, req.token_limit, user, context, "messages")

    async def completion(self, req: CompletionRequest, user: str | None, context: int
                         ) -> Prepared:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]
            vocab = self.tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            text = prompt if isinstance(prompt, str) else prompt[0]
            ids = await asyncio.to_thread(self.tokenizer.encode_text, text)
        return self._prepared(req, ids, req.max_tokens, user, context, "prompt")

    def _prepared(self, req: _SamplingFields, ids: list[int], max_tokens: int | None,
                  user: str | None, context: int, param: str) -> Prepared:
        try:
            shape = shape_request(user_key(user) if user else None, len(ids),
                                  max_tokens or self.default_max_tokens, context, param)
        except AdmissionError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        sampling = {k: v for k, v in req.sampling(shape.max_tokens).items() if k != "stop"}
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= token < vocab for token, _ in sampling["logit_bias"]):
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab})",
                           param="logit_bias")
        sampling["min_tokens"] = min(sampling["min_tokens"], shape.max_tokens)
        # Token ids travel as one packed buffer: an 8k-token list of Python ints cost ~1 ms
        # to pickle and unpickle on the way to the replica, the array a few microseconds.
        packed = array.array("I", ids)
        return Prepared({"prompt_token_ids": packed, "sampling": sampling}, shape,
                        tuple(req.stop_list()), sampling["min_tokens"])
