"""Clients whose terminal is smaller than the session: sent views, not the output.

The agent draws for the session's size; the same bytes on a smaller terminal
wrap and scroll into a scrambled screen. So a client that said its size
(``join`` rows/cols, ``viewport``, or its own ``resize``) and is smaller than
the session in either dimension is switched to views: the fan-out only marks
it dirty (no work on the output path), and :meth:`Views.serve` redraws the
part of the screen around the cursor for it from the screen model, at most
:data:`INTERVAL` apart, and never while its outbox still holds a view (a slow
reader gets fewer views, not a longer queue). When the session becomes no
larger than its terminal, it gets the whole screen once and then the output
again, byte for byte.
"""

from __future__ import annotations

from typing import Final

import trio

from .members import Attachment, Members
from .output import SessionOutput
from .protocol import data_frame

#: the least time between two views for one client (about 30 a second)
INTERVAL: Final = 0.03


class Views:
    def __init__(self, members: Members, output: SessionOutput) -> None:
        self._members = members
        self._output = output
        self._wanted = trio.Event()
        members.on_dirty = self._wake

    def _wake(self) -> None:
        self._wanted.set()

    def resized(self, by: Attachment, size: tuple[int, int]) -> None:
        """``by`` resized the session to its terminal's ``size``: who is sent views now?"""
        by.view = size
        for att in self._members:
            self.update(att, size, joined=False)

    def viewport(self, att: Attachment, view: tuple[int, int], session: tuple[int, int]) -> None:
        """``att``'s terminal is now ``view`` (rows, cols); the session's size is unchanged."""
        att.view = view
        self.update(att, session, joined=False)

    def update(self, att: Attachment, session_size: tuple[int, int], *, joined: bool) -> None:
        """Decide again whether ``att`` is sent views (its size or the session's changed).

        ``joined``: it was just sent the join rendering, drawn for its size.
        """
        rows, cols = session_size
        small = att.view is not None and (att.view[0] < rows or att.view[1] < cols)
        if small and not att.viewing:
            att.viewing = True
            # until now its terminal followed the output, or was just drawn: in the same modes
            att.shows_alternate = self._output.screen.modes.alternate
            att.dirty = not joined
            self._wake()
        elif not small and att.viewing:  # the whole screen once, then the output
            att.viewing = att.dirty = False
            self._send_view(att, cols, rows)

    async def serve(self) -> None:
        """Redraw views for the clients that have output to see, for the session's life."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await trio.sleep(INTERVAL)  # output that comes meanwhile joins this view
            for att in self._members:
                if not (att.viewing and att.dirty and att.view is not None):
                    continue
                on_the_way = att.outbox.statistics()
                if on_the_way.queued_bytes or on_the_way.inflight_bytes:  # its last view
                    self._wake()  # look again later
                    continue
                att.dirty = False
                self._send_view(att, att.view[1], att.view[0])

    def _send_view(self, att: Attachment, cols: int, rows: int) -> None:
        view, att.shows_alternate = self._output.screen.render_view(
            cols, rows, att.shows_alternate
        )
        if not att.outbox.put(data_frame(view)):
            self._members.evict(att)
