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
import fcntl
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

    def _load(self) -> dict[int, str]:
        try:
            fd = os.open(self._state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StartupError(f"cannot read {self._state_path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != 0 or st.st_mode & 0o077:
                raise StartupError(f"{self._state_path} must be owned by root, mode 0600")
            try:
                data = json.loads(f.read())
                return {int(uid): str(user) for uid, user in data["members"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StartupError(f"{self._state_path} is damaged: {exc}") from None

    def _save(self) -> None:
        directory = self._state_path.parent
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = directory / f".{STATE_FILE}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "members": {str(k): v for k, v in self._bindings.items()}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_path)

    def lock(self) -> None:
        """Hold the pool for this server's life: two servers must never share one."""
        if self.mode is IdentityMode.SHARED:
            return
        directory = Path(self._config.state_dir)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(
            directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"another aaau server uses the agent pool {self._config.agent_user}-NN "
                f"(its state is in {directory})"
            ) from None
        self._lock_fd = fd

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
    """The account, with its home made (0700, its own) if it is missing."""
    home = Path(account.home)
    if not home.is_dir():
        home.mkdir(mode=0o700)
        os.chown(home, account.uid, account.gid)
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
