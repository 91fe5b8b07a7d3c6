"""Budgets over time: a token bucket, and a note of what went over.

Pure: the caller passes the clock (``now``, seconds), so tests need no sleep.
Used for the control messages a connection may send, the output a session
may record, and how often one cause of refusal is recorded.
"""

from __future__ import annotations

import attrs


@attrs.define
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    _tokens: float = attrs.field(init=False)
    _at: float | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.burst

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` if it is there (then True); otherwise spend nothing."""
        self._refill(now)
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def take_up_to(self, now: float, amount: int) -> int:
        """Spend as much of ``amount`` as there is (whole tokens); how much that was."""
        self._refill(now)
        granted = max(0, min(amount, int(self._tokens)))
        self._tokens -= granted
        return granted


@attrs.define
class Overflow:
    """Counts what a budget refused during one episode, so it can be said once, not each time.

    ``refuse()`` is True the first time of an episode (say it); ``allow()``
    ends the episode and gives back how much was refused in it (say that).
    """

    refused: int = 0
    _over: bool = False

    def refuse(self, amount: int = 1) -> bool:
        first = not self._over
        self._over = True
        self.refused += amount
        return first

    def allow(self) -> int:
        """End of an episode: how much was refused in it (0: there was none)."""
        refused, self.refused, self._over = self.refused, 0, False
        return refused
