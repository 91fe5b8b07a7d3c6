"""Which agent user runs a member's agents, and what it leaves behind.

``Config.identity`` chooses:

- ``member`` (the default): each member who creates sessions gets an agent
  user of its own from the pool ``{agent_user}-01`` ... (made by ``aaau-server
  init --agents N`` through sysusers.d, so the server never edits the user
  database). The binding is made on first use and kept in
  ``{state_dir}/identities.json`` (root only), so the member's home, logins and
  agent configuration persist across its sessions; no other member's session
  ever runs as that user.
- ``session``: each session leases a pool user bound to no member; at its end
  every process of that user is killed and its home emptied.
- ``shared``: every session runs as ``agent_user``, as before the pool: no
  isolation between members (docs/operating.md says so).

At start the server checks every agent user (unprivileged, in no human group)
and empties the pool users bound to no member: after a crash they may hold a
dead session's processes and files.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio

from . import paths
from .config import Config, IdentityMode
from .errors import ErrorCode, RequestError, StartupError
from .policy import Groups, Identity

log = structlog.get_logger("aaau.identities")

STATE_FILE: Final = "identities.json"
LOCK_FILE: Final = "identities.lock"
#: how long the processes of a released identity may take to die after SIGKILL
_KILL_WAIT: Final = 5.0
_POLL: Final = 0.02


@attrs.frozen
class Account:
    """An agent user, as a session runs under it."""

    user: str
    uid: int
    gid: int
    home: str
    shell: str
    ephemeral: bool = False

    @classmethod
    def of(cls, pw: pwd.struct_passwd, *, ephemeral: bool = False) -> Account:
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell, ephemeral)


def pool_names(prefix: str, size: int) -> list[str]:
    return [f"{prefix}-{n:02d}" for n in range(1, size + 1)]


def _passwd(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


class Identities:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock_fd = -1
        self._leased: dict[str, str] = {}  # pool user -> session id (identity "session")
        self._bindings: dict[int, str] = {}  # member uid -> pool user (identity "member")

    @property
    def mode(self) -> IdentityMode:
        return self._config.identity

    @property
    def _state_path(self) -> Path:
        return Path(self._config.state_dir) / STATE_FILE

    def pool(self) -> list[pwd.struct_passwd]:
        """The pool users that exist, in order."""
        names = pool_names(self._config.agent_user, self._config.agent_pool)
        return [pw for pw in map(_passwd, names) if pw is not None]

    def accounts(self) -> list[pwd.struct_passwd]:
        """Every agent user that exists: the pool and the shared agent user."""
        shared = _passwd(self._config.agent_user)
        return self.pool() + ([shared] if shared else [])

    def agent_uids(self) -> frozenset[int]:
        return frozenset(pw.pw_uid for pw in self.accounts())

    # --- start ---------------------------------------------------------------------------

    def check(self, groups: Groups) -> None:
        """Refuse to start with an agent user that could act as a person, or none at all."""
        accounts = self.accounts()
        if self.mode is IdentityMode.SHARED and _passwd(self._config.agent_user) is None:
            raise StartupError(
                f"agent user {self._config.agent_user!r} does not exist (run aaau-server init)"
            )
        if self.mode is not IdentityMode.SHARED and not self.pool():
            raise StartupError(
                f"no pool users {self._config.agent_user}-01 ... exist for identity "
                f"{self.mode.value!r} (run aaau-server init)"
            )
        for pw in accounts:
            if pw.pw_uid == 0 or pw.pw_gid == 0:
                raise StartupError(f"agent user {pw.pw_name} has uid or gid 0: refusing to start")
            gids = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
            for gid in (groups.human_gid, groups.admin_gid):
                if gid is not None and gid in gids:
                    raise StartupError(
                        f"agent user {pw.pw_name} is a member of group {gid}: it could "
                        "connect to its own server; remove it from the aaau groups"
                    )
        if groups.human_gid is None:
            raise StartupError(
                f"group {self._config.group!r} does not exist (run aaau-server init)"
            )
        self._bindings = self._load()

    def _state_dir(self) -> int:
        """The checked state directory (made ``root:root 0755`` if missing)."""
        return paths.open_dir(self._config.state_dir, create=(0, 0, 0o755))

    def _load(self) -> dict[int, str]:
        dir_fd = self._state_dir()
        try:
            fd = paths.open_file(dir_fd, STATE_FILE, os.O_RDONLY, 0, self._config.state_dir)
        except FileNotFoundError:
            return {}
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise StartupError(f"{self._state_path} must be mode 0600")
            try:
                data = json.loads(f.read())
                return {int(uid): str(user) for uid, user in data["members"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StartupError(f"{self._state_path} is damaged: {exc}") from None

    def _save(self) -> None:
        dir_fd = self._state_dir()
        try:
            tmp = f".{STATE_FILE}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "w") as f:
                members = {str(k): v for k, v in self._bindings.items()}
                json.dump({"version": 1, "members": members}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, STATE_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def lock(self) -> None:
        """Hold the pool for this server's life: two servers must never share one."""
        if self.mode is IdentityMode.SHARED:
            return
        directory = self._config.state_dir
        dir_fd = self._state_dir()
        try:
            fd = paths.open_file(dir_fd, LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600, directory)
        finally:
            os.close(dir_fd)
        self._lock_fd = paths.hold(
            fd,
            f"another aaau server uses the agent pool {self._config.agent_user}-NN "
            f"(its state is in {directory})",
        )

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def recover(self) -> list[str]:
        """Empty the pool users bound to no member (a crash may have left a session's)."""
        if self.mode is IdentityMode.SHARED:
            return []
        bound = set(self._bindings.values())
        wiped = []
        for pw in self.pool():
            free = pw.pw_name not in bound and pw.pw_name not in self._leased
            if free and await _reset(Account.of(pw, ephemeral=True)):
                wiped.append(pw.pw_name)
        return wiped

    # --- sessions ----------------------------------------------------------------------

    def acquire(self, member: Identity, session_id: str) -> Account:
        """The account ``member``'s new session runs as."""
        if self.mode is IdentityMode.SHARED:
            pw = _passwd(self._config.agent_user)
            if pw is None:
                raise RequestError(
                    f"agent user {self._config.agent_user} does not exist",
                    code=ErrorCode.SPAWN_FAILED,
                )
            return Account.of(pw)
        if self.mode is IdentityMode.MEMBER and member.uid in self._bindings:
            pw = _passwd(self._bindings[member.uid])
            if pw is None:
                raise RequestError(
                    f"{member.user}'s agent user {self._bindings[member.uid]} no longer "
                    "exists (run aaau-server init)",
                    code=ErrorCode.SPAWN_FAILED,
                )
            return _with_home(Account.of(pw))
        pw = self._free()
        if self.mode is IdentityMode.SESSION:
            self._leased[pw.pw_name] = session_id
            return _with_home(Account.of(pw, ephemeral=True))
        self._bindings[member.uid] = pw.pw_name
        self._save()
        log.info("identity-bound", member=member.user, agent_user=pw.pw_name)
        return _with_home(Account.of(pw))

    def _free(self) -> pwd.struct_passwd:
        taken = set(self._bindings.values()) | set(self._leased)
        for pw in self.pool():
            if pw.pw_name not in taken:
                return pw
        pool = len(self.pool())
        raise RequestError(
            f"all {pool} agent users of the pool are in use; an admin can add more "
            f"(aaau-server init --agents {pool * 2})",
            code=ErrorCode.LIMIT,
        )

    async def release(self, account: Account) -> None:
        """After the session: an ephemeral account is emptied and returned to the pool."""
        if not account.ephemeral:
            return
        try:
            await _reset(account)
        finally:
            self._leased.pop(account.user, None)


def _with_home(account: Account) -> Account:
    """The account, with its home made (0700, its own) if it is missing.

    The homes' parent is checked (:mod:`aaau.paths`): root never makes a home in a
    directory another user could change under it.
    """
    parent, name = paths.directory_of(account.home)
    dir_fd = paths.open_dir(parent, create=(0, 0, 0o755))
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            return account
        os.chown(name, account.uid, account.gid, dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)
    return account


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    pids.append(int(entry.name))
    return pids


async def _reset(account: Account) -> bool:
    """Kill every process of ``account`` and empty its home; True if anything was there."""
    found = False
    with trio.move_on_after(_KILL_WAIT):
        while pids := _processes_of(account.uid):
            found = True
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await trio.sleep(_POLL)
    emptied = await trio.to_thread.run_sync(_empty_home, account)
    return found or emptied


def _empty_home(account: Account) -> bool:
    """Remove everything in the home (never following a symlink); keep it 0700, its own."""
    home = Path(account.home)
    found = False
    if home.is_symlink() or (home.exists() and not home.is_dir()):
        home.unlink()
        found = True
    if not home.exists():
        home.mkdir(mode=0o700)
    for entry in os.scandir(home):
        found = True
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)  # fd-based on Linux: immune to symlink races
        else:
            os.unlink(entry.path)
    os.chown(home, account.uid, account.gid, follow_symlinks=False)
    os.chmod(home, 0o700)  # a real directory (checked above), owned by root's parent
    return found
