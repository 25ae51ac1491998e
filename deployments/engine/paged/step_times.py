"""How long the engine's recent steps took: the decode-step median its stats report.

The step loop records every step here; a full log of them (what tests and benchmarks read)
is kept only once `testing.step_log` asks for it, so a serving engine holds 256 entries.
"""

from __future__ import annotations

import collections
import statistics

StepRecord = tuple[int, int, bool, float]  # (sequences, tokens, decode_only, seconds)
LOG_STEPS = 100_000  # most steps the full log keeps


class StepTimes:
    def __init__(self) -> None:
        self._decode: collections.deque[tuple[int, float]] = collections.deque(maxlen=256)
        self.log: collections.deque[StepRecord] | None = None  # on once testing asks

    def record(self, seqs: int, tokens: int, decode_only: bool, seconds: float) -> None:
        """One step (engine thread)."""
        if self.log is not None:
            self.log.append((seqs, tokens, decode_only, seconds))
        if decode_only:
            self._decode.append((seqs, seconds))

    def keep_log(self) -> collections.deque[StepRecord]:
        """The full log from now on (the same deque on every call)."""
        if self.log is None:
            self.log = collections.deque(maxlen=LOG_STEPS)
        return self.log

    def recent_decode(self) -> dict[str, float | None]:
        """Median time and batch of the last decode-only steps (any thread)."""
        recent = list(self._decode)  # one C-level copy: safe beside the engine thread
        if not recent:
            return {"decode_step_ms_p50": None, "decode_batch_p50": None}
        return {
            "decode_step_ms_p50": statistics.median(s for _, s in recent) * 1e3,
            "decode_batch_p50": statistics.median(n for n, _ in recent),
        }
