"""What a session records of its output: everything, within a budget, never silently.

One session must not be able to fill the disk for everyone (a detached
``cat /dev/urandom`` writes 37 MB/s). Output is recorded while the session
is within its budget: ``record_output_rate`` bytes a second with bursts of
``record_output_burst``, and ``record_output_max`` bytes in all (0: no total).
Past it, output still reaches the clients but is not recorded, and the log
says so: ``output_not_recorded`` (why) when an episode starts,
``output_recorded_again`` (how many bytes were left out) when it ends, and
``session_end`` carries the total. The same holds while the audit log cannot
take records at all.

Output is held for a moment before it is written (:meth:`AuditLog.hold`): the
chunks a flood reads from the PTY become one record of up to ``HOLD_BYTES``,
written ``HOLD_SECONDS`` after its first chunk or before any other record,
whichever comes first, with the first chunk's time. Per-record costs (JSON,
hash, ``write(2)``) then stay off the output path; the log keeps its order,
and input is still recorded before it is written.
"""

from __future__ import annotations

import time
from typing import Final

import trio

from .audit import AuditUnavailable, BoundAudit
from .config import Config
from .limits import Overflow, TokenBucket

#: output held past this many bytes is written at once
HOLD_BYTES: Final = 64 * 1024


class OutputRecording:
    def __init__(self, audit: BoundAudit, config: Config) -> None:
        self._audit = audit
        self._config = config
        self._budget = TokenBucket(config.record_output_rate, config.record_output_burst)
        self._skipped = Overflow()
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._held_since = 0.0
        self.recorded = 0  # bytes recorded in all
        self.not_recorded = 0  # bytes left out in all

    def reconfigure(self, config: Config) -> None:
        self.flush()
        self._config = config
        self._budget.rate = config.record_output_rate
        self._budget.burst = config.record_output_burst

    def record(self, data: bytes) -> None:
        """Take a chunk of output: held to be written, or counted as left out (and said)."""
        if not self._config.record_output:
            return
        why = self._over_budget(len(data))
        if why is not None:
            self._leave_out(len(data), why)
            return
        if not self._held:
            self._held_since = time.time()
            self._audit.hold(self, self.flush)
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= HOLD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the held output as one record (now: the log calls this before any other)."""
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        try:
            self._audit.write_bytes("output", data, source="agent", timestamp=self._held_since)
        except AuditUnavailable as exc:
            self._leave_out(len(data), f"the audit log cannot take records: {exc}")
            return
        self.recorded += len(data)
        if left_out := self._skipped.allow():
            self._audit.note(
                "output_recorded_again",
                source="system",
                metadata={"bytes_not_recorded": left_out},
            )

    def _leave_out(self, size: int, why: str) -> None:
        self.not_recorded += size
        if self._skipped.refuse(size):
            self._audit.note("output_not_recorded", source="system", content=why)

    def _over_budget(self, size: int) -> str | None:
        cap = self._config.record_output_max
        if cap and self.recorded + self._held_bytes + size > cap:
            return f"the session recorded its {cap} bytes of output (record_output_max)"
        if not self._budget.take(trio.current_time(), size):
            return (
                f"over the session's recording rate ({self._config.record_output_rate} "
                f"bytes/s, bursts of {self._config.record_output_burst}: record_output_rate)"
            )
        return None
