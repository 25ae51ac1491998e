"""Continuous batching: which sequences run this step, how many tokens each, with what pages.

Every step, running sequences continue (decoding ones take one token; prefilling ones a chunk of
their prompt), then waiting ones are admitted while the step's token budget and the sequence
limit allow. Long prompts are prefilled in chunks so they do not stall others' decoding. Pages
follow the `can_allocate`/`allocate` discipline; when they run out, idle users' kept caches go
first (least recently used), then the newest running sequence is preempted: its pages are freed
and it waits at the head of the queue to be recomputed and resumed, never failed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.sequence import Sequence, Status


@dataclass
class Batch:
    """One step's work, in order: sequence i feeds `num_tokens[i]` tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def samples(self, i: int) -> bool:
        """Whether sequence i's chunk reaches its last token, so a new token is sampled."""
        return self.seqs[i].num_computed + self.num_tokens[i] == len(self.seqs[i].token_ids)

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.num_tokens) and all(
            self.samples(i) for i in range(len(self.seqs)))

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_batched_tokens: int) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # oldest first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_batched_tokens
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = 1 if seq.is_decoding else min(seq.to_compute, budget)
            if n <= 0:
                continue
            if not self._reserve(seq, n, scheduled):
                self.preempt(seq)
                continue
            batch.add(seq, n)
            scheduled.add(id(seq))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self._admit(seq)
            n = min(seq.to_compute, budget)
            if not self._reserve(seq, n, scheduled, may_preempt=False):
                break  # wait for pages to free up; running sequences keep going
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            scheduled.add(id(seq))
            budget -= n
        return batch

    def _admit(self, seq: Sequence) -> None:
        if seq.admitted:
            return
        reuse = self.cache.checkout(seq.user_key, seq.token_ids)
        seq.pages, seq.num_computed = reuse.pages, reuse.tokens
        seq.cached_tokens, seq.private, seq.admitted = reuse.tokens, reuse.private, True

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int], may_preempt: bool = True
                 ) -> bool:
        """Give `seq` pages for `n` more tokens: evict idle users, then preempt newer ones."""
        need = self.cache.pages_for(seq.num_computed + n) - len(seq.pages)
        while not self.cache.can_allocate(need):
            if self.cache.evict_lru_idle() is not None:
                continue
            victim = next((s for s in reversed(self.running)
                           if s is not seq and id(s) not in scheduled), None)
            if not may_preempt or victim is None:
                return False
            self.preempt(victim)
        seq.pages += self.cache.allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages; it waits first in line and is recomputed."""
        self.cache.free(seq.pages)
        seq.pages, seq.num_computed = [], 0
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # ---- endings --------------------------------------------------------------------------

    def finish(self, seq: Sequence) -> None:
        """A sequence ended (or was aborted): keep its cache for its user, or free it."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        if not seq.admitted:
            return
        if seq.private:
            self.cache.free(seq.pages)
        else:
            kv_len = min(seq.num_computed, len(seq.token_ids))
            self.cache.checkin(seq.user_key, list(seq.token_ids), kv_len, seq.pages)
        seq.pages = []

    def check_integrity(self) -> None:
        self.cache.check_integrity(s.pages for s in [*self.running, *self.waiting])
        for seq in self.running:
            assert self.cache.pages_for(seq.num_computed) <= len(seq.pages), "KV beyond pages"
