"""SO_PEERCRED and the user database: who is connected, looked up now."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

from .errors import StartupError
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


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def resolve_groups(agent_user: str, group: str, admin_group: str) -> Groups:
    try:
        agent_uid: int | None = pwd.getpwnam(agent_user).pw_uid
    except KeyError:
        agent_uid = None
    return Groups(agent_uid=agent_uid, human_gid=_gid(group), admin_gid=_gid(admin_group))


def agent_account(agent_user: str, groups: Groups, group_name: str) -> pwd.struct_passwd:
    """The agent user, if it may run agents: it exists, is not root, is in no human group."""
    try:
        agent = pwd.getpwnam(agent_user)
    except KeyError:
        raise StartupError(
            f"agent user {agent_user!r} does not exist (run aaau-server init)"
        ) from None
    if agent.pw_uid == 0 or agent.pw_gid == 0:
        raise StartupError(f"agent user {agent.pw_name} has uid or gid 0: refusing to start")
    gids = set(os.getgrouplist(agent.pw_name, agent.pw_gid))
    for gid in (groups.human_gid, groups.admin_gid):
        if gid is not None and gid in gids:
            raise StartupError(
                f"agent user {agent.pw_name} is a member of group {gid}: it could "
                "connect to its own server; remove it from the aaau groups"
            )
    if groups.human_gid is None:
        raise StartupError(f"group {group_name!r} does not exist (run aaau-server init)")
    return agent
