"""SO_PEERCRED and the user database: who is connected, looked up now."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

from .policy import Groups, Identity

_UCRED = struct.Struct("3i")


class UnknownPeer(Exception):
    pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock``, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def identify(pid: int, uid: int, gid: int) -> Identity:
    """The identity of a peer, with its group memberships as the database says now.

    Groups come from the user database (primary plus supplementary), not
    from the peer process, so a membership removed since the peer logged in
    no longer counts.
    """
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise UnknownPeer(f"uid {uid} has no user") from None
    groups = frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid))
    return Identity(uid=uid, gid=gid, pid=pid, user=pw.pw_name, groups=groups)


def user_name(uid: int) -> str:
    """The user database's name for ``uid``, or ``#uid``."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def resolve_groups(agent_uids: frozenset[int], group: str, admin_group: str) -> Groups:
    return Groups(agent_uids=agent_uids, human_gid=_gid(group), admin_gid=_gid(admin_group))
