"""Token logprobs in OpenAI's shapes, on the ingress (torch-free).

Replicas send, per generated token, `[logprob, [[id, logprob], ...]]` (the raw distribution's:
engine/paged/logits_rules.py); the text stream pairs each with its token id
(`[id, logprob, top]`). Here they become chat's `{"content": [{token, logprob, bytes,
top_logprobs}]}` or completions' `{tokens, token_logprobs, top_logprobs, text_offset}`. A
token's text is its own bytes (the tokenizer's byte table), decoded with replacement where a
token holds part of a UTF-8 character, as vLLM shows it; `bytes` are exact.
"""

from __future__ import annotations

from typing import Any

from deployments.detokenizer import TokenDecoder

LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM reports this instead
Entry = list[Any]  # [token id, logprob, [[id, logprob], ...]]


class LogprobFormatter:
    """Formats one tokenizer's token logprobs (shared by every request)."""

    def __init__(self, decoder: TokenDecoder) -> None:
        self.decoder = decoder

    def piece(self, token_id: int) -> bytes:
        table = self.decoder.table
        if table is not None:
            return table.piece(token_id) or b""
        return self.decoder.tokenizer.decode([token_id]).encode()

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.piece(token_id)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": max(float(logprob), LOGPROB_FLOOR),
            "bytes": list(raw),
        }

    def chat(self, entries: list[Entry]) -> dict[str, Any]:
        """choices[].logprobs of a chat completion (or chunk)."""
        return {
            "content": [
                {**self._token(tid, lp), "top_logprobs": [self._token(t, v) for t, v in top]}
                for tid, lp, top in entries
            ]
        }

    def completion(self, entries: list[Entry], offset: int) -> tuple[dict[str, Any], int]:
        """choices[].logprobs of a text completion (or chunk) whose text starts at character
        `offset` of the answer; and the offset after these tokens."""
        tokens, offsets = [], []
        for tid, _, _ in entries:
            offsets.append(offset)
            text = self.piece(tid).decode("utf-8", errors="replace")
            tokens.append(text)
            offset += len(text)
        top = [
            {
                self.piece(t).decode("utf-8", errors="replace"): max(v, LOGPROB_FLOOR)
                for t, v in reversed(top)
            }
            for _, _, top in entries
        ]  # reversed: first wins
        return {
            "tokens": tokens,
            "token_logprobs": [max(float(lp), LOGPROB_FLOOR) for _, lp, _ in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }, offset
