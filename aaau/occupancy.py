"""How many connections each person holds, so none can take the server's fds.

Counted by the uid SO_PEERCRED gives, before anything else is read: at most
``connections_per_user`` open, of which at most ``hellos_per_user`` have not
yet said hello, and ``max_connections`` in all. A refusal for a limit is
recorded at most once a second per person (with how many were not), so a
script hammering the socket cannot fill the audit log either.
"""

from __future__ import annotations

import collections

import attrs

from .config import Config
from .limits import TokenBucket

#: refusals recorded per person: one a second, five at once
_RECORD_RATE, _RECORD_BURST = 1.0, 5


@attrs.define
class Occupancy:
    config: Config
    _open: collections.Counter[int] = attrs.field(factory=collections.Counter)
    _pending: collections.Counter[int] = attrs.field(factory=collections.Counter)
    _quiet: dict[int, TokenBucket] = attrs.field(factory=dict)
    _unrecorded: collections.Counter[int] = attrs.field(factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def arrive(self, uid: int) -> str | None:
        """A new connection from ``uid``: None (counted), or why it is refused."""
        cfg = self.config
        if self.total >= cfg.max_connections:
            return f"the server holds {cfg.max_connections} connections (max_connections)"
        if self._open[uid] >= cfg.connections_per_user:
            return (
                f"uid {uid} already holds {self._open[uid]} connections "
                f"(connections_per_user {cfg.connections_per_user})"
            )
        if self._pending[uid] >= cfg.hellos_per_user:
            return (
                f"uid {uid} already has {self._pending[uid]} connections that have not said "
                f"hello (hellos_per_user {cfg.hellos_per_user})"
            )
        self._open[uid] += 1
        self._pending[uid] += 1
        return None

    def hello(self, uid: int) -> None:
        """The connection said hello (or gave up trying): no longer pending."""
        self._pending[uid] -= 1
        if self._pending[uid] <= 0:
            del self._pending[uid]

    def leave(self, uid: int) -> None:
        self._open[uid] -= 1
        if self._open[uid] <= 0:
            del self._open[uid]

    def record_refusal(self, uid: int, now: float) -> int | None:
        """Should this refusal be recorded? None: no; else how many before it were not."""
        bucket = self._quiet.setdefault(uid, TokenBucket(_RECORD_RATE, _RECORD_BURST))
        if bucket.take(now):
            return self._unrecorded.pop(uid, 0)
        self._unrecorded[uid] += 1
        return None
