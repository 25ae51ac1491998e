"""Grace advice for the engine's managed ranges: advise, prefetch, read back after each phase.

Only on a coherent node (the layout says `advise`). Each range is advised before its first touch
and prefetched where it belongs; with `isolate`, every advised range was allocated alone in
whole 2 MiB blocks (memory_advice.isolated_empty), so no neighbour's advice or prefetch can move
part of it. Where the advisor can read advice back (the driver's), `check` (advice_check.py)
remembers every placed range and `phase` reads them all back, logging any that moved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from deployments.advice_check import AdviceCheck
from deployments.memory_advice import MemoryAdvisor, Where

logger = logging.getLogger(__name__)


@dataclass
class Placer:
    advisor: MemoryAdvisor
    isolate: bool = True  # advised ranges alone in whole 2 MiB blocks
    check: AdviceCheck | None = None  # read-backs, where the advisor can read

    @classmethod
    def of(cls, advisor: MemoryAdvisor | None, isolate: bool) -> Placer | None:
        if advisor is None:
            return None
        return cls(advisor, isolate, AdviceCheck(advisor) if hasattr(advisor, "read") else None)

    def prefer(self, name: str, tensor: Any, where: Where) -> None:
        """Advise `tensor` (called `name` in read-backs) to live at `where`."""
        self.advisor.prefer(tensor, where)
        if self.check is not None:
            self.check.place(name, tensor, where)

    def prefetch(self, name: str, tensor: Any, where: Where) -> None:
        self.advisor.prefetch(tensor, where)
        if self.check is not None:
            self.check.prefetched(name)

    def phase(self, phase: str) -> None:
        """Read every advised range back (where the advisor can); log the ones that moved."""
        if self.check is None:
            return
        for wrong in self.check.check(phase):
            logger.warning(
                "after %s, %s (advised to the %s) reads preferred %d, last prefetched %d: %s",
                phase,
                wrong["name"],
                wrong["where"],
                wrong["preferred"],
                wrong["prefetched"],
                wrong["runs"],
            )
