"""The clients attached to one session: who they are, their roles, the fan-out.

A client is an :class:`Attachment`: an identity, a role decided here (never
by the client), an :class:`aaau.outbox.Outbox`, and the audit log bound to
it. :class:`Members` adds and removes attachments and hands frames to every
outbox without waiting; an outbox that overflows is removed on the spot
(its connection says ``too-slow``). Removing a client for cause (revoked,
evicted) and the end of the session close the outbox: that is how a
connection learns it must hang up. Nothing here touches a socket.
"""

from __future__ import annotations

import collections
import itertools
from collections import Counter
from collections.abc import Callable, Iterator

import attrs

from . import codec, policy
from . import messages as m
from .audit import BoundAudit
from .config import Audience, Config
from .errors import ErrorCode, RequestError
from .outbox import Outbox
from .policy import Identity, Standing
from .protocol import data_frame
from .vtscan import Effect, Segment, without

_client_ids = itertools.count(1)


def removed_for(config: Config, role: m.Role) -> frozenset[Effect]:
    """The kinds of escape sequence a client in ``role`` does not receive."""
    audiences = {
        Effect.CLIPBOARD_WRITE: config.clipboard_writes_to,
        Effect.CLIPBOARD_QUERY: config.clipboard_queries_to,
        Effect.QUERY: config.terminal_queries_to,
        Effect.TITLE: config.titles_to,
        Effect.HYPERLINK: config.hyperlinks_to,
    }
    allowed = (
        (Audience.ALL,)
        if role is m.Role.READONLY
        else (Audience.ALL, Audience.INTERACTIVE, Audience.TYPIST)
    )
    return frozenset(effect for effect, audience in audiences.items() if audience not in allowed)


@attrs.define(eq=False)
class Attachment:
    """One client attached to a session: who, in which role, and its outbox."""

    identity: Identity
    standing: Standing
    role: m.Role
    outbox: Outbox
    audit: BoundAudit  # bound to this client: user, uid, role, session, client id
    client_id: int
    input_window: int = 0  # bytes of input in flight (0: may not type)
    #: escape sequences this client's role does not receive (the output filter)
    removed: frozenset[Effect] = frozenset()
    #: the client's terminal (rows, cols), if it said; smaller than the session, the
    #: client is sent redrawn views of the screen instead of the output (aaau.views)
    view: tuple[int, int] | None = None
    viewing: bool = False
    dirty: bool = False  # output came since its last view
    shows_alternate: bool = False  # while sent views: its terminal is on the alternate screen

    def info(self) -> m.ClientInfo:
        return m.ClientInfo(self.client_id, self.identity.user, self.identity.uid, self.role)

    def send(self, message: m.ServerMessage) -> bool:
        return self.outbox.put(codec.encode(message))


class Members:
    """The attachments of one session, and what they are sent."""

    def __init__(
        self,
        session_id: str,
        audit: BoundAudit,
        *,
        creator_uid: int,
        shared: bool,
        config: Config,
    ) -> None:
        self._session_id = session_id
        self._audit = audit  # bound to the session
        self._creator_uid = creator_uid
        self._shared = shared
        self.config = config
        self._clients: dict[int, Attachment] = {}
        #: called when a client that is sent views has output to see (aaau.views)
        self.on_dirty: Callable[[], None] = lambda: None
        #: the client who typed last: the one terminal queries go to (Audience.TYPIST)
        self.typist: Attachment | None = None

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[Attachment]:
        return iter(list(self._clients.values()))

    def infos(self) -> tuple[m.ClientInfo, ...]:
        return tuple(att.info() for att in self._clients.values())

    def max_role(self, identity: Identity, standing: Standing) -> m.Role:
        return policy.max_role(
            standing, identity.uid, creator_uid=self._creator_uid, shared=self._shared
        )

    def join(
        self,
        identity: Identity,
        standing: Standing,
        outbox: Outbox,
        requested: m.Role | None,
        *,
        created: bool,
    ) -> Attachment:
        """A new attachment, recorded; not yet told anything, not yet receiving output."""
        self._check_room(identity, standing)
        role = policy.grant(self.max_role(identity, standing), requested)
        client_id = next(_client_ids)
        window = self.config.input_window if policy.may_write(role) else 0
        att = Attachment(
            identity,
            standing,
            role,
            outbox,
            self._bind(identity, role, client_id),
            client_id,
            window,
            removed_for(self.config, role),
        )
        att.audit.write(
            "join",
            metadata={
                "created": created,
                "requested_role": requested.value if requested else None,
                "peer_pid": identity.pid,
            },
        )
        return att

    def _check_room(self, identity: Identity, standing: Standing) -> None:
        """A place for ``identity``: the last ``reserved_clients`` are the creator's and
        admins'; anyone else may hold at most ``observers_per_user`` of them."""
        cfg, count = self.config, len(self._clients)
        privileged = standing is Standing.ADMIN or identity.uid == self._creator_uid
        limit = cfg.clients_per_session - (0 if privileged else cfg.reserved_clients)
        if count >= limit:
            kept = "" if privileged else f", {cfg.reserved_clients} kept for its creator and admins"
            raise RequestError(
                f"session {self._session_id} already has {count} clients "
                f"(limit {cfg.clients_per_session}{kept})",
                code=ErrorCode.LIMIT,
            )
        mine = sum(1 for att in self._clients.values() if att.identity.uid == identity.uid)
        if not privileged and mine >= cfg.observers_per_user:
            raise RequestError(
                f"{identity.user} already has {mine} clients in session {self._session_id} "
                f"(limit {cfg.observers_per_user})",
                code=ErrorCode.LIMIT,
            )

    def add(self, att: Attachment) -> None:
        """From now on ``att`` gets every frame; the others hear it joined."""
        self.broadcast(m.Joined(att.info()))
        self._clients[att.client_id] = att

    def _bind(self, identity: Identity, role: m.Role, client_id: int) -> BoundAudit:
        return self._audit.bind(
            source="human", user=identity.user, uid=identity.uid, role=role, client_id=client_id
        )

    def fan_out(self, frame: bytes) -> None:
        """``frame`` to every client, never waiting; one that cannot take it is evicted."""
        for att in list(self._clients.values()):
            if not att.outbox.put(frame):
                self.evict(att)

    def fan_out_output(self, segments: list[Segment], raw: bytes) -> Counter[Effect]:
        """Output to every client, less what its role does not receive; what was removed.

        One frame per distinct filter, built once; output with nothing to remove is one
        shared frame, as before the filter.
        """
        effects = {effect for _, effect in segments if effect is not None}
        frames: dict[frozenset[Effect], bytes | None] = {}
        removed: Counter[Effect] = collections.Counter()
        answerer = self._answerer() if Effect.QUERY in effects else None
        for att in list(self._clients.values()):
            if att.viewing:
                att.dirty = True
                self.on_dirty()
                continue
            key = att.removed & effects
            if answerer is not None and att is not answerer:
                key |= {Effect.QUERY}
            if key not in frames:
                data = without(segments, key) if key else raw
                frames[key] = data_frame(data) if data else None
                removed.update(effect for _, effect in segments if effect in key)
            frame = frames[key]
            if frame is not None and not att.outbox.put(frame):
                self.evict(att)
        return removed

    def _answerer(self) -> Attachment | None:
        """With queries to the typist only: who gets them (None: the filter decides alone)."""
        if self.config.terminal_queries_to is not Audience.TYPIST:
            return None
        typist = self.typist
        if (
            typist is not None
            and self._clients.get(typist.client_id) is typist
            and Effect.QUERY not in typist.removed
            and not typist.viewing
        ):
            return typist
        for att in self._clients.values():  # the first attached who may get queries
            if Effect.QUERY not in att.removed and not att.viewing:
                return att
        return None

    def broadcast(self, message: m.ServerMessage) -> None:
        self.fan_out(codec.encode(message))

    def leave(self, att: Attachment, reason: str) -> None:
        """The client left (or its connection ended); its outbox is its connection's."""
        if self._clients.pop(att.client_id, None) is not None:
            att.audit.note("leave", content=reason)
            self.broadcast(m.Left(att.info()))

    def evict(self, att: Attachment) -> None:
        """Its outbox overflowed (the connection says ``too-slow``): out it goes."""
        if self._clients.pop(att.client_id, None) is not None:
            att.audit.note(
                "client_evicted",
                source="system",
                content=f"client fell more than {att.outbox.limit} bytes behind",
            )
            self.broadcast(m.Left(att.info()))

    def revoke(self, att: Attachment, reason: str) -> None:
        """Hang up on a client whose right to be here is gone."""
        if self._clients.pop(att.client_id, None) is not None:
            att.audit.note("client_revoked", source="system", content=reason)
            att.send(m.Error(ErrorCode.REVOKED, reason))
            att.outbox.close()
            self.broadcast(m.Left(att.info()))

    def change_role(self, att: Attachment, identity: Identity, standing: Standing) -> None:
        """After a reload: the client's standing now; a role it may no longer hold is lowered."""
        allowed = self.max_role(identity, standing)
        att.identity, att.standing = identity, standing
        if att.role.rank > allowed.rank:
            previous, att.role = att.role, allowed
            att.removed = removed_for(self.config, allowed)
            att.audit = self._bind(identity, allowed, att.client_id)
            att.audit.note(
                "role_changed", source="system", content=f"{previous.value} -> {allowed.value}"
            )
            att.send(m.RoleChanged(allowed, "group membership changed"))

    def hang_up_all(self, last: m.ServerMessage, flush_grace: float) -> None:
        """The session is over: ``last`` to everyone, then every outbox closed."""
        frame = codec.encode(last)
        for att in self._clients.values():
            att.outbox.put(frame)
            att.outbox.close(flush_grace=flush_grace)
        self._clients.clear()
