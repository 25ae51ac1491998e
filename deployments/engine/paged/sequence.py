"""One request as the paged engine tracks it: its tokens, its pages, its progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from deployments.engine.interface import SamplingParams
from deployments.engine.paged.sampler import draw_base
from deployments.engine.token_stream import TokenStream


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    user_key: str | None
    token_ids: list[int]  # prompt, then every generated token
    sampling: SamplingParams
    stream: TokenStream | None = None  # where its tokens land (None: nobody reads them)
    prompt_len: int = 0
    num_computed: int = 0  # positions [0, num_computed) have KV in `pages`
    pages: list[int] = field(default_factory=list)  # every block's page (full-attention lane)
    # Chunked-attention lanes (chunk_window.py): each lane's pages of blocks [chunk_base, ...).
    chunk_pages: list[list[int]] = field(default_factory=list)
    chunk_base: int = 0
    cached_tokens: int = 0  # prompt tokens the user's kept cache supplied
    private: bool = True  # cache not kept after the request (anonymous, or user busy)
    admitted: bool = False  # the user's kept cache has been checked out
    status: Status = Status.WAITING
    num_generated: int = 0
    aborted: bool = False
    # Each draw's random key mixes this with the index of the token drawn: the request's seed
    # (reproducible), else a random one (sampler.draw_base).
    sample_seed: int = field(default_factory=draw_base)
    restore: Any = None  # the cache manager's move bringing this user's pages up, until done
    counts_slot: int = 0  # its row of the runner's TokenCounts (0: none; penalties only)
    grammar: Any = None  # its response_format constraint (engine.grammar.Grammar), if any
    tenant: str = ""  # the API key's id its user belongs to (engine.kv_shares)
    # Tokens sampled by a step still running on the device that a next step feeds: they count
    # in the sequence's length but are not in `token_ids` yet (the next step reads them on
    # the device; each lands at the end of `token_ids` when the host has it).
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.token_ids)

    def all_pages(self) -> list[int]:
        """Every page it holds, all lanes."""
        return [*self.pages, *(p for lane in self.chunk_pages for p in lane)]

    @property
    def num_tokens(self) -> int:
        """Its length: every token known on the host and those still in flight."""
        return len(self.token_ids) + self.in_flight

    @property
    def to_compute(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.to_compute == 1

    def land(self, token: int) -> None:
        """A sampled token reached the host: it takes the place of the oldest in flight (or,
        the last token of all, which no step feeds, simply ends the sequence's tokens)."""
        self.token_ids.append(token)
        self.in_flight = max(0, self.in_flight - 1)
        self.num_generated += 1
