"""What the agent writes: to every client (filtered per role), to the log, for later.

:class:`SessionOutput` is the output byte path after the PTY reader: the
scanner splits each chunk once (:mod:`aaau.vtscan`); the members get it, less
what each role must not receive; then it is recorded (:mod:`aaau.recording`),
kept for late joiners (raw scrollback) and fed to the screen model
(:mod:`aaau.screen`), in that order, with no await in between. Removed
sequences are counted per kind, said once per session and kind
(``output_filtered``), and their totals go into ``session_end``.
"""

from __future__ import annotations

import collections

import trio

from .audit import BoundAudit
from .config import Config
from .members import Members
from .pty import Scrollback
from .recording import OutputRecording
from .screen import Screen
from .vtscan import Effect, Scanner, Segment


class SessionOutput:
    def __init__(
        self, members: Members, audit: BoundAudit, config: Config, cols: int, rows: int
    ) -> None:
        self._members = members
        self._audit = audit
        self._scanner = Scanner()
        self.scrollback = Scrollback(config.scrollback_bytes)
        self.recording = OutputRecording(audit, config)
        self.screen = Screen(
            cols,
            rows,
            history=config.screen_history,
            rate=config.screen_rate,
            burst=config.screen_burst,
            backlog=config.screen_backlog,
        )
        self.filtered: collections.Counter[Effect] = collections.Counter()

    @property
    def holding(self) -> bool:
        """Work waits for a pause in the output: a sequence held back, the screen behind."""
        return self._scanner.holding or self.screen.behind

    def publish(self, data: bytes) -> None:
        """A chunk from the PTY: fan it out, then record and keep it."""
        self._publish(self._scanner.feed(data))

    def flush(self) -> None:
        """Output paused: let out a held sequence that cannot be a removable one,
        and let the screen catch up as far as its budget allows."""
        self._publish(self._scanner.flush())
        self.screen.catch_up(trio.current_time())

    def _publish(self, segments: list[Segment]) -> None:
        if not segments:
            return
        raw = segments[0][0] if len(segments) == 1 else b"".join(s for s, _ in segments)
        removed = self._members.fan_out_output(segments, raw)
        # recorded right after it is handed on, off the echo's critical path; input,
        # which has an effect, is recorded before it is written
        self.recording.record(raw)
        self.scrollback.append(raw)
        self.screen.feed(segments, trio.current_time())
        for effect, count in removed.items():
            if not self.filtered[effect]:
                self._audit.note(
                    "output_filtered",
                    content=f"{effect} sequences are removed for some of this session's clients",
                    metadata={"effect": str(effect)},
                )
            self.filtered[effect] += count

    def end_metadata(self) -> dict[str, object]:
        """What ``session_end`` says of the output: what was not recorded, what was removed."""
        self.recording.flush()
        return {
            "output_recorded": self.recording.recorded,
            "output_not_recorded": self.recording.not_recorded,
            "filtered": {str(k): v for k, v in self.filtered.items()},
        }

    def rendering(self, cols: int, rows: int) -> bytes:
        """The screen as it is, drawn for a terminal of that size."""
        if self.screen.stale:
            self.screen.rebuild(self.scrollback.snapshot())
        return self.screen.render(cols, rows)

    def resize(self, cols: int, rows: int) -> None:
        self.screen.resize(cols, rows)

    def reconfigure(self, config: Config) -> None:
        self.scrollback.limit = config.scrollback_bytes
        self.screen.backlog_limit = config.screen_backlog
        self.recording.reconfigure(config)
