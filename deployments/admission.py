"""One request's admission figures: computed once, at the ingress, and passed along.

The ingress tokenizes a request, so it knows its exact prompt length; it fits the completion
length to the model's context and keys the user. That `RequestShape` travels with the request:
the router ranks replicas by the KV bytes it will hold (`kv_bytes`), the replica refuses it when
not even an emptied replica could hold them, and the engine reads its user key. Nothing
downstream estimates, re-hashes or re-counts. Imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass


class AdmissionError(ValueError):
    """A request that cannot fit the model's context: the client's mistake (a 400)."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RequestShape:
    """What a request asks of a replica."""

    user_key: str | None  # identity.user_key of its user; None: its cache is not kept
    prompt_tokens: int
    max_tokens: int  # the completion length, already fitted to the context
    tenant: str = ""  # the caller's API key id (auth.tenant_of); "" with auth off

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV the request holds when it ends: its prompt and all it generates."""
        return self.prompt_tokens + self.max_tokens

    def kv_bytes(self, bytes_per_token: int) -> int:
        return self.kv_tokens * bytes_per_token


def shape_request(
    user_key: str | None,
    prompt_tokens: int,
    max_tokens: int,
    context: int,
    param: str,
    limit_param: str | None = None,
    tenant: str = "",
) -> RequestShape:
    """The shape of a request whose prompt (`param`: the field holding it) has
    `prompt_tokens` tokens, asking for up to `max_tokens` more, on a model of `context`
    tokens. A length the client set (`limit_param` names its field) that does not fit after
    the prompt is refused, as vLLM refuses it; the server's default length is cut to fit."""
    if prompt_tokens == 0:
        raise AdmissionError("the prompt is empty", param, "empty_prompt")
    if prompt_tokens >= context:
        raise AdmissionError(
            f"the prompt has {prompt_tokens} tokens but this model's context is {context} "
            "tokens (prompt plus at least one new token must fit)",
            param,
            "context_length_exceeded",
        )
    if limit_param is not None and prompt_tokens + max_tokens > context:
        raise AdmissionError(
            f"this model's context is {context} tokens, but {prompt_tokens} prompt tokens "
            f"plus {limit_param}={max_tokens} make {prompt_tokens + max_tokens}; lower "
            f"{limit_param} to at most {context - prompt_tokens}",
            limit_param,
            "context_length_exceeded",
        )
    return RequestShape(
        user_key, prompt_tokens, max(1, min(max_tokens, context - prompt_tokens)), tenant
    )
