"""Continuous batching: which sequences run this step, how many tokens each, with what pages.

Every step, running sequences continue (decoding ones take one token; prefilling ones a chunk of
their prompt), then waiting ones are admitted while the step's token budget and the sequence
limit allow. Long prompts are prefilled in chunks so they do not stall others' decoding. Pages
follow the `can_allocate`/`allocate` discipline; when they run out, idle users' kept caches move
down to the host tier if there is one (least recently used first; a step waits while such moves
are in flight), else they are dropped, and only then is the newest running sequence preempted:
its pages are freed and it waits at the head of the queue to be recomputed and resumed, never
failed. A returning user whose cache is on the host waits (without holding up the queue) while
its pages come back, then prefills what it adds.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Protocol

from deployments.engine.kv_shares import BACKGROUND
from deployments.engine.paged.cache_manager import CacheManager, Move
from deployments.engine.paged.sequence import Sequence, Status


@dataclass
class Batch:
    """One step's work, in order: sequence i feeds `num_tokens[i]` tokens from position
    `starts[i]`, and samples a new token when `sampling[i]`.

    Frozen at `add`: these facts keep their meaning after the sequences move on (once the
    step is launched, its sequences count its tokens as computed).
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    sampling: list[bool] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)
        self.starts.append(seq.num_computed)
        self.sampling.append(seq.num_computed + n == seq.num_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence i's chunk reaches its last token, so a new token is sampled."""
        return self.sampling[i]

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.num_tokens) and all(self.sampling)

    def __len__(self) -> int:
        return len(self.seqs)


class Mover(Protocol):
    """Copies a move's pages between tiers (see tier_mover.CopyMover)."""

    def launch(self, move: Move) -> None: ...
    def done(self, move: Move) -> bool: ...
    def wait(self, move: Move) -> None: ...


class Room(enum.Enum):
    OK = "ok"  # the pages were allocated
    WAIT = "wait"  # moves in flight will free enough: try again next step
    NO = "no"  # impossible now


class Scheduler:
    def __init__(
        self,
        cache: CacheManager,
        max_num_seqs: int,
        max_batched_tokens: int,
        mover: Mover | None = None,
    ) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.mover = mover if cache.host_pages_total else None
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # oldest first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> Batch:
        self.poll()
        batch = Batch()
        budget = self.max_batched_tokens
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = 1 if seq.is_decoding else min(seq.to_compute, budget)
            if n <= 0:
                continue
            room = self._reserve(seq, n, scheduled)
            if room is Room.NO:
                self.preempt(seq)
            if room is not Room.OK:
                continue
            batch.add(seq, n)
            scheduled.add(id(seq))
            budget -= n
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if not seq.admitted and self._admit(seq) is not Room.OK:
                break  # its cache cannot come back yet; keep the queue's order
            if seq.restore is not None:
                continue  # its pages are still on their way up; others may go ahead
            n = min(seq.to_compute, budget)
            if self._reserve(seq, n, scheduled, may_preempt=False) is not Room.OK:
                break  # wait for pages to free up; running sequences keep going
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            scheduled.add(id(seq))
            budget -= n
        return batch

    def _admit(self, seq: Sequence) -> Room:
        """Check the user's kept cache out for `seq` (bringing it up from the host tier)."""
        restore = self.cache.restore_cost(seq.user_key, seq.token_ids)
        if restore:
            room = self._make_room(restore, seq, set(), may_preempt=False)
            if room is not Room.OK:
                return room
        reuse = self.cache.checkout(seq.user_key, seq.token_ids, seq.tenant)
        seq.pages, seq.num_computed = reuse.pages, reuse.tokens
        seq.chunk_pages, seq.chunk_base = list(reuse.chunk_pages), reuse.chunk_base
        seq.cached_tokens, seq.private, seq.admitted = reuse.tokens, reuse.private, True
        if reuse.restore is not None:
            seq.restore = reuse.restore
            self.mover.launch(reuse.restore)  # type: ignore[union-attr]
            self.poll()
        return Room.OK

    def _reserve(
        self, seq: Sequence, n: int, scheduled: set[int], may_preempt: bool = True
    ) -> Room:
        """Give `seq` pages for `n` more tokens (see `_make_room` for how room is made),
        first releasing its chunked lanes' pages behind its window (chunk_window.py)."""
        window = self.cache.window
        self.cache.free(window.release(seq))
        need = window.need(seq, seq.num_computed + n)
        room = self._make_room(need, seq, scheduled, may_preempt)
        if room is Room.OK:
            window.grow(seq, seq.num_computed + n, self.cache.allocate(need))
        return room

    def _make_room(self, need: int, seq: Sequence, scheduled: set[int], may_preempt: bool) -> Room:
        """Free device pages: move idle users down, drop idle users, preempt newer sequences."""
        while not self.cache.can_allocate(need):
            if self.cache.free_pages + self.cache.draining_pages() >= need:
                return Room.WAIT
            if self._offload_one(seq.tenant) or self.cache.evict_lru_idle(seq.tenant) is not None:
                continue
            # With nothing else running to free pages, the shares yield rather than leave
            # `seq` waiting forever (only possible when the shares add up to more than 1).
            alone = all(s is seq for s in self.running) and not self.cache.moves
            if alone and self.cache.evict_lru_idle(seq.tenant, override=True) is not None:
                continue
            victim = next(
                (s for s in reversed(self.running) if s is not seq and id(s) not in scheduled), None
            )
            if not may_preempt or victim is None:
                return Room.WAIT if self.cache.moves else Room.NO
            self.preempt(victim)
        return Room.OK

    def _offload_one(self, requester: str | None) -> bool:
        if self.mover is None:
            return False
        move = self.cache.start_offload(requester)
        if move is None:
            return False
        self.mover.launch(move)
        self.poll()
        return True

    def poll(self) -> None:
        """Finish the moves whose copies are done (their source pages become free)."""
        if self.mover is None:
            return
        for move in list(self.cache.moves):
            if self.mover.done(move):
                self.cache.complete(move)
        for seq in self.waiting:
            if seq.restore is not None and seq.restore not in self.cache.moves:
                seq.restore = None

    def keep_free(self, pages: int) -> None:
        """Between steps: move idle users down until `pages` device pages are free or freeing."""
        while (
            self.mover is not None
            and self.cache.free_pages + self.cache.draining_pages() < pages
            and self._offload_one(BACKGROUND)
        ):
            pass

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages; it waits first in line and is recomputed."""
        self.cache.free(seq.all_pages())
        seq.pages, seq.chunk_pages, seq.chunk_base, seq.num_computed = [], [], 0, 0
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def advance(self, batch: Batch) -> None:
        """Right after `batch` is launched: its tokens count as computed, and each token it
        samples that a next step feeds counts in flight until it lands."""
        for seq, n, samples in zip(batch.seqs, batch.num_tokens, batch.sampling, strict=True):
            seq.num_computed += n
            if samples and seq.num_generated + seq.in_flight + 1 < seq.sampling.max_tokens:
                seq.in_flight += 1  # not its last token: it decodes on

    # ---- endings --------------------------------------------------------------------------

    def finish(self, seq: Sequence) -> None:
        """A sequence ended (or was aborted): keep its cache for its user, or free it."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.in_flight = 0  # tokens still in flight are never needed now
        if not seq.admitted:
            return
        if seq.restore is not None:  # its pages are being written: let the copy finish
            self.mover.wait(seq.restore)  # type: ignore[union-attr]
            self.poll()
            seq.restore = None
        if seq.private:
            self.cache.free(seq.all_pages())
        else:
            kv_len = min(seq.num_computed, len(seq.token_ids))
            self.cache.checkin(
                seq.user_key,
                list(seq.token_ids),
                kv_len,
                seq.pages,
                seq.chunk_pages,
                seq.chunk_base,
            )
        seq.pages, seq.chunk_pages = [], []

    def check_integrity(self) -> None:
        self.cache.check_integrity(s.all_pages() for s in [*self.running, *self.waiting])
        for seq in self.running:
            assert self.cache.pages_for(seq.num_computed) <= len(seq.pages), "KV beyond pages"
