"""POSIX ACLs, just enough to let a second group through: the admins reach the socket.

The socket's directory is ``root:aaau 0750`` and the socket ``root:aaau
0660``; an admin who is only in ``aaau-admin`` (as people expect of an admin
group) is let through by a named-group entry on both (``group:aaau-admin:r-x``
on the directory, ``rw-`` on the socket), written as the kernel's
``system.posix_acl_access`` extended attribute (the format of
``include/uapi/linux/posix_acl_xattr.h``: no ``libacl`` needed). The mode's
bits stay what they were: the mask is the group's bits.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Final

_XATTR: Final = "system.posix_acl_access"
_VERSION: Final = 2
_UNDEFINED: Final = 0xFFFFFFFF
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def encode(mode: int, groups: dict[int, int], users: dict[int, int] | None = None) -> bytes:
    """The attribute for a file of ``mode`` with named entries ``{id: rwx bits}``. The
    mask is what ``setfacl`` makes it: the union of the owning group's and the named
    entries' bits."""
    user, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
    users = users or {}
    mask = group
    for perm in (*groups.values(), *users.values()):
        mask |= perm
    entries = [(_USER_OBJ, user, _UNDEFINED)]
    entries += [(_USER, perm, uid) for uid, perm in sorted(users.items())]
    entries += [(_GROUP_OBJ, group, _UNDEFINED)]
    entries += [(_GROUP, perm, gid) for gid, perm in sorted(groups.items())]
    entries += [(_MASK, mask, _UNDEFINED), (_OTHER, other, _UNDEFINED)]
    return struct.pack("<I", _VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def decode(data: bytes) -> tuple[dict[int, int], dict[int, int]]:
    """The named entries of an attribute: ``({gid: rwx}, {uid: rwx})``."""
    (version,) = struct.unpack_from("<I", data)
    if version != _VERSION:
        raise ValueError(f"POSIX ACL version {version}")
    groups, users = {}, {}
    for offset in range(4, len(data) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", data, offset)
        if tag == _GROUP:
            groups[ident] = perm
        elif tag == _USER:
            users[ident] = perm
    return groups, users


def let_group_in(target: int | str, gid: int) -> None:
    """Give group ``gid`` what the owning group has on ``target`` (an fd or a path, not
    followed if a link): ``r-x`` on a ``0750`` directory, ``rw-`` on a ``0660`` socket.
    Named entries someone else added (``setfacl -m g:auditors:x``) are kept."""
    st = os.stat(target, follow_symlinks=False) if isinstance(target, str) else os.fstat(target)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{target}: a symbolic link")
    groups, users = _named(target)
    mode = stat.S_IMODE(st.st_mode)
    groups[gid] = (mode >> 3) & 7
    attr = encode(mode, groups, users)
    if isinstance(target, str):
        os.setxattr(target, _XATTR, attr, follow_symlinks=False)
    else:
        os.setxattr(target, _XATTR, attr)


def _named(target: int | str) -> tuple[dict[int, int], dict[int, int]]:
    try:
        if isinstance(target, str):
            return decode(os.getxattr(target, _XATTR, follow_symlinks=False))
        return decode(os.getxattr(target, _XATTR))
    except (OSError, ValueError, struct.error):
        return {}, {}


def groups_of(target: str) -> dict[int, int]:
    """The named groups on ``target`` ({} when it has no ACL)."""
    return _named(target)[0]
