"""Pages of chunked-attention layers: which blocks of a sequence they still hold.

With `ModelSpec.kv_lanes` a page holds a slice of layers (a lane). A sequence holds lane 0's
pages (full attention layers) for every block of `page_size` tokens, in `pages`; each chunked
lane holds pages only for the blocks from `chunk_base` on (`chunk_pages`, one list a lane),
because a query at position p reads chunked layers' keys only from p's chunk start on. Blocks
before the chunk of the next token to compute are released; a step that crosses a chunk
boundary keeps the chunk its first token is in until the next step.

A kept (idle) user stores one flat page list (`flatten`): lane 0's pages of every block of its
`kv_len` tokens, then each chunked lane's pages of the blocks from `start(kv_len)` on, so
tier moves and exports copy pages without knowing lanes. Attention chunks are whole pages
(the layout refuses others), so a chunk starts at a page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class HoldsPages(Protocol):
    """What a sequence (sequence.Sequence) holds: KV for [0, num_computed) in its pages."""

    pages: list[int]
    chunk_pages: list[list[int]]
    chunk_base: int
    num_computed: int


@dataclass(frozen=True)
class ChunkWindow:
    """`lanes` chunked lanes whose attention chunk is `chunk` tokens (0 lanes: none)."""

    lanes: int = 0
    chunk: int = 0
    page_size: int = 1

    def __post_init__(self) -> None:
        if self.lanes and (self.chunk <= 0 or self.chunk % self.page_size):
            raise ValueError(
                f"attention chunks of {self.chunk} tokens are not whole pages of "
                f"{self.page_size} tokens: set engine.page_size to a divisor of the chunk"
            )

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def start(self, position: int) -> int:
        """The first block chunked lanes need for queries from `position` on."""
        if not self.lanes:
            return 0
        return position // self.chunk * self.chunk // self.page_size

    def kept_pages(self, kv_len: int) -> int:
        """Pages a kept cache of `kv_len` tokens holds, all lanes together."""
        blocks = self.blocks(kv_len)
        return blocks + self.lanes * (blocks - self.start(kv_len))

    def peak_pages(self, tokens: int, step_tokens: int) -> int:
        """The most pages a sequence of `tokens` tokens holds at once, its steps feeding at
        most `step_tokens` tokens (its window: a chunk and a step's blocks, one partial)."""
        blocks = self.blocks(tokens)
        window = self.chunk // self.page_size + self.blocks(step_tokens) + 1
        return blocks + self.lanes * min(blocks, window)

    def reusable(self, tokens: int, kv_len: int) -> int:
        """Of `tokens` a prompt could reuse from a kept cache of `kv_len`, those whose
        chunked KV the cache still holds: all from its current chunk on, else up to a chunk
        boundary (where chunked layers need nothing earlier)."""
        if not self.lanes or tokens >= self.start(kv_len) * self.page_size:
            return tokens
        return tokens // self.chunk * self.chunk

    def need(self, seq: HoldsPages, tokens: int) -> int:
        """Pages `seq` must add to hold KV for its first `tokens` tokens (its chunked lanes
        counted from its window on, as after `release`)."""
        blocks = self.blocks(tokens)
        full = max(0, blocks - len(seq.pages))
        if not self.lanes:
            return full
        base = self.start(seq.num_computed)
        end = seq.chunk_base + len(seq.chunk_pages[0]) if seq.chunk_pages else base
        return full + self.lanes * max(0, blocks - max(end, base))

    def release(self, seq: HoldsPages) -> list[int]:
        """Drop `seq`'s chunked pages of blocks before its window; the pages to free. New
        lists replace the old ones (the page table rewrites a row whose list changed)."""
        if not self.lanes:
            return []
        base = self.start(seq.num_computed)
        if not seq.chunk_pages:
            seq.chunk_pages, seq.chunk_base = [[] for _ in range(self.lanes)], base
            return []
        drop = min(base - seq.chunk_base, len(seq.chunk_pages[0]))
        if base <= seq.chunk_base:
            return []
        freed = [p for lane in seq.chunk_pages for p in lane[:drop]]
        seq.chunk_pages = [lane[drop:] for lane in seq.chunk_pages]
        seq.chunk_base = base
        return freed

    def grow(self, seq: HoldsPages, tokens: int, pages: list[int]) -> None:
        """Give `seq` the `need(seq, tokens)` pages `pages` (after `release`)."""
        blocks = self.blocks(tokens)
        full = max(0, blocks - len(seq.pages))
        seq.pages += pages[:full]
        if not self.lanes:
            return
        rest = pages[full:]
        each = len(rest) // self.lanes
        for j, lane in enumerate(seq.chunk_pages):
            lane += rest[j * each : (j + 1) * each]  # in place: the page table adds only these

    def flatten(self, full: list[int], lanes: list[list[int]]) -> list[int]:
        return [*full, *(p for lane in lanes for p in lane)]

    def split(self, flat: list[int], kv_len: int) -> tuple[list[int], list[list[int]], int]:
        """A kept cache's flat list -> (lane 0's pages, each chunked lane's, their base)."""
        blocks, base = self.blocks(kv_len), self.start(kv_len)
        each = blocks - base
        lanes = [flat[blocks + j * each : blocks + (j + 1) * each] for j in range(self.lanes)]
        return flat[:blocks], lanes, base

    def keep(self, flat: list[int], kv_len: int, tokens: int) -> tuple[list[int], list[int]]:
        """Of a kept cache's flat list (of `kv_len` tokens), the entries a sequence reusing
        `tokens` of it keeps (in flat order for `tokens`) and those it drops."""
        full, lanes, base = self.split(flat, kv_len)
        blocks, new_base = self.blocks(tokens), self.start(tokens)
        kept_full = full[:blocks]
        kept_lanes = [lane[max(0, new_base - base) : max(0, blocks - base)] for lane in lanes]
        kept = self.flatten(kept_full, kept_lanes)
        held = set(kept)
        return kept, [p for p in flat if p not in held]
