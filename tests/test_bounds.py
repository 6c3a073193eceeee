"""Bounds on what peers may use: call budgets and the byte quota's measurement (logic only;
tests/test_rogue_peer.py runs them against a real agent)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from phaul.agent.budget import Budget, CallBudgets
from phaul.config import Limits
from phaul.errors import Busy
from phaul.migration import quota


def test_budgets_bound_each_caller_and_each_class() -> None:
    budgets = CallBudgets({"peer": Budget(total=3, each=2), "admin": Budget(total=1, each=1)})
    with budgets.call("peer", "p1"), budgets.call("peer", "p1"):
        with pytest.raises(Busy, match="p1 has 2 calls"):
            with budgets.call("peer", "p1"):
                pass
        with budgets.call("peer", "p2"):
            with pytest.raises(Busy, match="3 calls from peers"):
                with budgets.call("peer", "p3"):
                    pass
            with budgets.call("admin", "root"):  # peers at their bound never take the admins' share
                pass
    with budgets.call("peer", "p1"), budgets.call("peer", "p1"):  # every slot came back
        pass


def test_budget_released_when_the_call_fails() -> None:
    budgets = CallBudgets({"peer": Budget(1, 1)})
    with pytest.raises(RuntimeError):
        with budgets.call("peer", "p1"):
            raise RuntimeError
    with budgets.call("peer", "p1"):
        pass


def test_tree_bytes_counts_blocks_once_and_follows_nothing(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(1 << 20))
    root = tmp_path / "recv"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(os.urandom(256 << 10))
    os.link(root / "a" / "f", root / "hardlink")
    (root / "link").symlink_to(outside)
    (root / "sparse").write_bytes(b"")
    os.truncate(root / "sparse", 1 << 30)
    used = quota.tree_bytes(root)
    assert 256 << 10 <= used < (256 << 10) + (64 << 10)  # one copy of f, dirs; no 1 MiB, no sparse GiB


def test_quota_check_names_the_overrun() -> None:
    limits = Limits()
    q = limits.quota(100 << 20)
    assert q == int((100 << 20) * limits.quota_factor) + limits.quota_extra
    quota.check(quota.Usage(q, 10 << 30), q, 1 << 20)
    with pytest.raises(quota.QuotaExceeded, match="over its quota"):
        quota.check(quota.Usage(q + 1, 10 << 30), q, 1 << 20)
    with pytest.raises(quota.QuotaExceeded, match="under the reserve"):
        quota.check(quota.Usage(0, 1 << 19), q, 1 << 20)


def test_watch_cuts_off_once_over(tmp_path: Path) -> None:
    root = tmp_path / "recv"
    root.mkdir()
    hit = threading.Event()
    grew = threading.Event()
    seen: list[quota.QuotaExceeded] = []
    watch = quota.QuotaWatch(root, 1 << 20, 0, lambda e: (seen.append(e), hit.set()), grew.set)
    watch.start()
    try:
        (root / "f").write_bytes(os.urandom(2 << 20))
        assert hit.wait(10)
    finally:
        watch.stop()
    assert grew.is_set() and len(seen) == 1 and "over its quota" in seen[0].message
