"""POSIX ACLs written as the kernel's xattr: the kernel accepts them, and what others
added is kept."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aaau import acl


def test_the_admins_group_is_added_and_other_entries_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir(mode=0o750)
    target.chmod(0o750)
    try:  # an operator's own entries first (setfacl -m g:12345:x,u:23456:r)
        os.setxattr(target, "system.posix_acl_access", acl.encode(0o750, {12345: 1}, {23456: 4}))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this file system: {exc.strerror}")
    acl.let_group_in(str(target), 4242)
    groups, users = acl.decode(os.getxattr(target, "system.posix_acl_access"))
    assert groups == {12345: 1, 4242: 0o5} and users == {23456: 4}
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # the mask is the group's r-x
    acl.let_group_in(str(target), 4242)  # again: the same, not a second entry
    assert acl.groups_of(str(target)) == {12345: 1, 4242: 0o5}


def test_a_link_is_never_given_an_acl(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError, match="symbolic link"):
        acl.let_group_in(str(tmp_path / "link"), 4242)
    assert acl.groups_of(str(tmp_path / "real")) == {}
