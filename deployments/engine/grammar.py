"""Output constrained to JSON (OpenAI's `response_format`) through llguidance, on the host.

A request's `Grammar` is an llguidance `LLMatcher` over the engine's tokenizer: before each of
the request's draws, `mask_words` gives the allowed tokens as int32 words (bit t % 32 of word
t // 32), which the batched sampler applies on the device (logits_rules.apply_rules); after a
draw, `accept` advances the matcher. Once the JSON is complete only end-of-sequence tokens are
allowed. Whitespace between JSON tokens is not free (llguidance's `whitespace_flexible` off):
output is compact, so a weak model cannot spin in whitespace up to max_tokens.

llguidance was chosen over xgrammar and outlines: it installs from PyPI as one wheel with no
dependencies (xgrammar pulls triton and tvm-ffi even on a CPU machine; outlines needs
outlines-core and more), computes a mask in tens of microseconds without a per-schema
precompilation step, and vLLM ships it as its `guidance` backend. Torch-free.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from deployments.engine.interface import RequestError

_tokenizers: dict[int, Any] = {}
_lock = threading.Lock()


def _ll_tokenizer(tokenizer: Any, vocab: int, eos_ids: frozenset[int]) -> Any:
    """llguidance's view of a transformers tokenizer, built once per tokenizer."""
    import llguidance.hf

    with _lock:
        hit = _tokenizers.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            hit = _tokenizers[id(tokenizer)] = (
                tokenizer,
                llguidance.hf.from_tokenizer(
                    tokenizer, n_vocab=vocab, eos_token=sorted(eos_ids) or None
                ),
            )
        return hit[1]


def schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema a response_format asks for ({"type": "object"} for json_object)."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else {}
    raise RequestError(
        f"response_format type {kind!r} cannot constrain output", param="response_format.type"
    )


class Grammar:
    """One request's JSON constraint (engine thread only, after construction)."""

    def __init__(
        self, response_format: str, tokenizer: Any, vocab: int, eos_ids: frozenset[int]
    ) -> None:
        """Raises RequestError (a 400) for a schema llguidance cannot compile."""
        import llguidance

        schema = schema_of(json.loads(response_format))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab, eos_ids), grammar)
        if self.matcher.is_error():
            raise RequestError(
                f"response_format: {self.matcher.get_error()}",
                param="response_format",
                code="invalid_json_schema",
            )
        self.words = -(-vocab // 32)

    def mask_words(self) -> np.ndarray:
        """int32 [ceil(vocab / 32)]: the tokens the next draw may take."""
        out = np.zeros(self.words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        return out

    def accept(self, token: int) -> None:
        """Advance past a drawn token (one the mask allowed; an EOS after the end is fine)."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)
