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
"""

from __future__ import annotations

import trio

from .audit import AuditUnavailable, BoundAudit
from .config import Config
from .limits import Overflow, TokenBucket


class OutputRecording:
    def __init__(self, audit: BoundAudit, config: Config) -> None:
        self._audit = audit
        self._config = config
        self._budget = TokenBucket(config.record_output_rate, config.record_output_burst)
        self._skipped = Overflow()
        self.recorded = 0  # bytes recorded in all
        self.not_recorded = 0  # bytes left out in all

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self._budget.rate = config.record_output_rate
        self._budget.burst = config.record_output_burst

    def record(self, data: bytes) -> None:
        if not self._config.record_output:
            return
        why = self._over_budget(len(data))
        if why is None:
            try:
                self._audit.write_bytes("output", data, source="agent")
            except AuditUnavailable as exc:
                why = f"the audit log cannot take records: {exc}"
        if why is not None:
            self.not_recorded += len(data)
            if self._skipped.refuse(len(data)):
                self._audit.note("output_not_recorded", source="system", content=why)
            return
        self.recorded += len(data)
        if left_out := self._skipped.allow():
            self._audit.note(
                "output_recorded_again",
                source="system",
                metadata={"bytes_not_recorded": left_out},
            )

    def _over_budget(self, size: int) -> str | None:
        cap = self._config.record_output_max
        if cap and self.recorded + size > cap:
            return f"the session recorded its {cap} bytes of output (record_output_max)"
        if not self._budget.take(trio.current_time(), size):
            return (
                f"over the session's recording rate ({self._config.record_output_rate} "
                f"bytes/s, bursts of {self._config.record_output_burst}: record_output_rate)"
            )
        return None
