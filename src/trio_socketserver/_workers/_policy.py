# The supervisor's rule for workers that die unasked: how long to wait before replacing one,
# and when the deaths are a crash loop that must end the supervisor. Pure bookkeeping (times
# in, decisions out), so the rule is tested without starting a process; _supervisor.py does
# the waiting and the starting.
"""Backoff and the crash-loop rule for workers that die unasked."""

from __future__ import annotations

import attrs

STABLE_AFTER = 10.0
"""A worker that ran this many seconds before dying died a *slow* death: its replacement
starts at once and its slot's count of fast crashes starts over. Ten seconds is well past
an interpreter's start and a handler module's import (what breaks first when a deploy is
bad), and short enough that a worker dying once a minute to a rare bug never adds up to a
crash loop."""

BACKOFF = (0.0, 0.25, 0.5, 1.0)
"""Seconds before the replacement after the 1st, 2nd, 3rd and 4th fast crash in a row of
one worker slot. The first replacement is immediate (a single crash, e.g. the OOM killer,
should cost as little as possible); then each wait doubles, so a worker that dies as it
starts does not burn a core restarting."""

CRASH_LOOP = len(BACKOFF) + 1
"""The fast crash in a row, in one slot, that is a crash loop: the supervisor stops, exits
with status 1 and logs why. Five attempts over about two seconds of backoff (plus the
starts themselves) is enough to ride out a transient failure and short enough that a
broken deploy fails visibly instead of restarting forever."""


@attrs.frozen
class Verdict:
    """What to do about a worker that died unasked."""

    fast: bool
    """Whether it died within ``STABLE_AFTER`` seconds of being started."""
    streak: int
    """Fast crashes in a row in its slot, this one included (0 after a slow death)."""
    delay: float | None
    """Seconds to wait before starting its replacement; None: a crash loop, stop."""


@attrs.define
class CrashPolicy:
    """Counts fast crashes in a row per worker slot (a slot is one of the N workers)."""

    _streaks: dict[int, int] = attrs.Factory(dict)

    def worker_died(self, slot: int, uptime: float) -> Verdict:
        """Record that the worker of ``slot`` died unasked after ``uptime`` seconds."""
        if uptime >= STABLE_AFTER:
            self._streaks[slot] = 0
            return Verdict(fast=False, streak=0, delay=0.0)
        streak = self._streaks.get(slot, 0) + 1
        self._streaks[slot] = streak
        delay = BACKOFF[streak - 1] if streak < CRASH_LOOP else None
        return Verdict(fast=True, streak=streak, delay=delay)
