"""Who may connect, and what role each person gets in each session.

Pure functions of an :class:`Identity` (decided from SO_PEERCRED and the
user database at connect time) and session facts. Never trusts the client.
"""

from __future__ import annotations

import enum

import attrs

from .messages import Role


class Standing(enum.Enum):
    """A person's standing on the server as a whole."""

    ADMIN = "admin"  # root or a member of the admin group
    MEMBER = "member"  # a member of the human group


@attrs.frozen
class Identity:
    """Who is on the other end of a connection."""

    uid: int
    gid: int
    pid: int
    user: str
    groups: frozenset[int]


@attrs.frozen
class Groups:
    """The numeric ids the admission policy needs (None: no such group)."""

    agent_uids: frozenset[int]  # every agent identity: the pool and the shared agent user
    human_gid: int | None
    admin_gid: int | None


@attrs.frozen
class Refusal:
    reason: str


def admit(identity: Identity, groups: Groups) -> Standing | Refusal:
    """The standing of ``identity`` on the server, or why it is refused.

    The agent user is always refused, whatever its groups.
    """
    if identity.uid in groups.agent_uids:
        return Refusal(f"user {identity.user} is an agent user and may not connect")
    if identity.uid == 0:
        return Standing.ADMIN
    if groups.admin_gid is not None and groups.admin_gid in identity.groups:
        return Standing.ADMIN
    if groups.human_gid is not None and groups.human_gid in identity.groups:
        return Standing.MEMBER
    return Refusal(f"user {identity.user} (uid {identity.uid}) is not a member of the aaau groups")


def max_role(
    standing: Standing, uid: int, *, creator_uid: int | None = None, shared: bool = False
) -> Role:
    """The strongest role ``uid`` may hold in a session (``creator_uid`` None: outside any).

    The one mapping from standing to role: an Admin is Admin everywhere; a
    member is Interactive in its own and in shared sessions, ReadOnly elsewhere,
    and ReadOnly outside a session (ASys calls that need no session).
    """
    if standing is Standing.ADMIN:
        return Role.ADMIN
    if creator_uid is not None and (uid == creator_uid or shared):
        return Role.INTERACTIVE
    return Role.READONLY


def grant(allowed: Role, requested: Role | None) -> Role:
    """A client may ask for less than it is allowed, never more."""
    return allowed if requested is None else requested.at_most(allowed)


def may_write(role: Role) -> bool:
    """Input and resize."""
    return role is not Role.READONLY


def may_kill(role: Role, uid: int, *, creator_uid: int) -> bool:
    """FORCE_KILL: an Admin, or the creator unless it attached read-only."""
    return role is Role.ADMIN or (uid == creator_uid and role is not Role.READONLY)
