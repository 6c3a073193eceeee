"""Concurrency budgets: how many calls each kind of caller may have running.

The agent serves peers (other agents, during migrations) and admins (the CLI)
from one thread pool. A compromised or runaway peer must not be able to take
every thread, or one peer all of the peers' share: calls are counted per
class (peer, admin) and per caller, and a call beyond its budget is refused
at once with RESOURCE_EXHAUSTED instead of queueing behind the others.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from phaul.errors import Busy


@dataclass(frozen=True)
class Budget:
    total: int  # calls of this class at once
    each: int  # calls of one caller of this class at once


class CallBudgets:
    """Counts running calls per class and per caller."""

    def __init__(self, budgets: dict[str, Budget]) -> None:
        self.budgets = budgets
        self._lock = threading.Lock()
        self._classes: Counter[str] = Counter()
        self._callers: Counter[tuple[str, str]] = Counter()

    @contextmanager
    def call(self, kind: str, caller: str) -> Iterator[None]:
        """Hold one call of `caller` (of class `kind`) for the block; Busy when over budget."""
        budget = self.budgets[kind]
        key = (kind, caller)
        with self._lock:
            if self._classes[kind] >= budget.total:
                raise Busy(f"{budget.total} calls from {kind}s are running already", "try again in a moment")
            if self._callers[key] >= budget.each:
                raise Busy(f"{caller} has {budget.each} calls running already", "try again when one has ended")
            self._classes[kind] += 1
            self._callers[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._classes[kind] -= 1
                self._callers[key] -= 1
