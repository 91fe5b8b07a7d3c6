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
_USER_OBJ, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x04, 0x08, 0x10, 0x20


def encode(mode: int, groups: dict[int, int]) -> bytes:
    """The attribute for a file of ``mode`` with named groups ``{gid: rwx bits}``;
    the mask is the owning group's bits, so no named group gets more than it."""
    user, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
    entries = [(_USER_OBJ, user, _UNDEFINED), (_GROUP_OBJ, group, _UNDEFINED)]
    entries += [(_GROUP, perm & group, gid) for gid, perm in sorted(groups.items())]
    entries += [(_MASK, group, _UNDEFINED), (_OTHER, other, _UNDEFINED)]
    return struct.pack("<I", _VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def decode(data: bytes) -> dict[int, int]:
    """The named groups of an attribute: ``{gid: rwx bits}``."""
    (version,) = struct.unpack_from("<I", data)
    if version != _VERSION:
        raise ValueError(f"POSIX ACL version {version}")
    out = {}
    for offset in range(4, len(data), 8):
        tag, perm, ident = struct.unpack_from("<HHI", data, offset)
        if tag == _GROUP:
            out[ident] = perm
    return out


def let_group_in(target: int | str, gid: int) -> None:
    """Give group ``gid`` what the owning group has on ``target`` (an fd or a path, not
    followed if a link): ``r-x`` on a ``0750`` directory, ``rw-`` on a ``0660`` socket."""
    st = os.stat(target, follow_symlinks=False) if isinstance(target, str) else os.fstat(target)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{target}: a symbolic link")
    mode = stat.S_IMODE(st.st_mode)
    attr = encode(mode, {gid: (mode >> 3) & 7})
    if isinstance(target, str):
        os.setxattr(target, _XATTR, attr, follow_symlinks=False)
    else:
        os.setxattr(target, _XATTR, attr)


def groups_of(target: str) -> dict[int, int]:
    """The named groups on ``target`` ({} when it has no ACL)."""
    try:
        return decode(os.getxattr(target, _XATTR, follow_symlinks=False))
    except OSError:
        return {}
