"""Fixtures: real users, a real server subprocess, clients that are real peers.

Testing rules for this suite:
- Tests that need root are marked ``root`` (``from .helpers import root``);
  they are skipped when not run as root, and ``pytest -m "not root"`` runs
  the rest: pure logic and the server's middle in-process, in seconds.
- Root-only tests create real users and groups with the ``aaut`` prefix, run
  ``aaau-server init`` for them, start the real server as a subprocess and
  connect as those users: a helper process drops to the user's uid,
  connects, and hands the connected socket back (SCM_RIGHTS), so SO_PEERCRED
  on the server sees that user.
- No sleeps as synchronisation: ``wait_for`` polls a condition under a deadline.
- Every async test has an absolute bound through ``fail_after``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from aaau.cgroups import Hierarchies

from .helpers import (
    ADMIN_GROUP,
    AGENT,
    CGROUP_BASE,
    GROUP,
    HOMES,
    PAM_SERVICE,
    POOL,
    USERS,
    ServerFactory,
    ServerProc,
    init_argv,
    server_argv,
    server_env,
)
from .terminals import Tmux


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: real users, setuid, chown")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def no_nft_table_left() -> Iterator[None]:
    """NET_ISOLATE tests make ``table inet aaau`` (the server removes its rules, and leaves
    the table for other servers): removed at the end if no rule is left in it and it was
    not there before."""
    nft = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
    listed = ["list", "table", "inet", "aaau"]
    before = nft is not None and subprocess.run([nft, *listed], capture_output=True).returncode == 0
    yield
    if nft is None or before:
        return
    found = subprocess.run([nft, "-j", *listed], capture_output=True, text=True)
    if found.returncode != 0:
        return
    items = json.loads(found.stdout).get("nftables", [])
    if not any("rule" in item for item in items):
        subprocess.run([nft, "delete", "table", "inet", "aaau"], capture_output=True)


@pytest.fixture(scope="session")
def base_dir() -> Iterator[Path]:
    """A scratch directory every test user can traverse (tmp_path is root-only).

    Not under /tmp: each agent has a /tmp of its own, and must see these files.
    """
    path = Path(tempfile.mkdtemp(prefix="aaut-test-", dir="/var/lib"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def accounts(base_dir: Path) -> Iterator[dict[str, Any]]:
    """The test agent users and groups (via the real init), and the human test users.

    All of them, their homes and the test PAM service are removed at the end.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        result = subprocess.run(
            init_argv(base_dir), capture_output=True, text=True, cwd="/", check=False
        )
        assert result.returncode == 0, result.stderr
        for user, groups in USERS.items():
            try:
                pwd.getpwnam(user)
            except KeyError:
                _run(["useradd", "--no-create-home", "--shell", "/bin/sh", user])
            groups_arg = ",".join(groups)
            _run(["usermod", "-G", groups_arg, user])
        yield {"init_output": result.stdout}
    finally:
        remove_test_accounts()


def remove_test_accounts() -> None:
    """Every user, group, home and file the test accounts brought to the machine."""
    users = [*USERS, AGENT, *POOL]
    for user in users:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True, check=False)
    for user in users:
        subprocess.run(["userdel", "--force", user], capture_output=True, check=False)
    for group in (GROUP, ADMIN_GROUP, AGENT, *POOL):
        subprocess.run(["groupdel", group], capture_output=True, check=False)
    shutil.rmtree(HOMES, ignore_errors=True)
    Path(f"/etc/pam.d/{PAM_SERVICE}").unlink(missing_ok=True)
    remove_cgroup_base(CGROUP_BASE)


def remove_cgroup_base(base: str) -> None:
    """The tests' cgroup base in every hierarchy (the sessions' cgroups are gone by now)."""
    where = Hierarchies.discover()
    for mount in [where.v2, *where.v1.values()]:
        if mount is not None and (mount / base).is_dir():
            for child in (mount / base).iterdir():
                if child.is_dir():
                    child.rmdir()
            (mount / base).rmdir()


# --- the server -------------------------------------------------------------------------------


_counter = iter(range(10**6))


@pytest.fixture
async def start_server(
    accounts: dict[str, Any], base_dir: Path, nursery: trio.Nursery
) -> AsyncIterator[ServerFactory]:
    """Start real servers (subprocesses); all are stopped with SIGTERM at the end."""
    started: list[ServerProc] = []

    async def start(
        *args: str,
        env: dict[str, str] | None = None,
        expect_ready: bool = True,
        socket_path: Path | None = None,
        log_dir: Path | None = None,
        wrapper: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> ServerProc:
        """``wrapper``: a command to run the server under (``prlimit ... --``);
        ``pass_fds``: more fds it inherits (a socket for activation)."""
        n = next(_counter)
        log_dir = log_dir or base_dir / f"log-{n}"
        sock = socket_path or base_dir / f"run-{n}" / "aaau.sock"
        r, w = os.pipe()
        log_dir.mkdir(mode=0o750, exist_ok=True)
        stderr_path = log_dir / "server.stderr"
        stderr_file = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        argv = [
            *wrapper,
            *server_argv(sock, log_dir, "--ready-fd", str(w), "--kill-grace", "0.5", *args),
        ]
        process = await nursery.start(
            lambda task_status: trio.run_process(
                argv,
                pass_fds=(w, *pass_fds),
                cwd="/",
                check=False,
                env=env or server_env(),
                task_status=task_status,
                stderr=stderr_file,
            )
        )
        os.close(w)
        os.close(stderr_file)
        ready = trio.lowlevel.FdStream(r)
        with trio.fail_after(20):
            line = await ready.receive_some(64)
        await ready.aclose()
        srv = ServerProc(process, sock, log_dir)
        started.append(srv)
        if expect_ready:
            assert line.startswith(b"READY"), (
                f"server did not start: {process.returncode}: {stderr_path.read_text()[-2000:]}"
            )
        return srv

    try:
        yield start
    finally:
        for srv in started:
            for peer in srv.peers:
                await peer.aclose()
            if srv.process.returncode is None:
                srv.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            for srv in started:
                await srv.process.wait()


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    """A tmux server of the test's own (tests/terminals.py), killed at the end."""
    t = Tmux()
    try:
        yield t
    finally:
        t.kill()


@pytest.fixture
async def server(start_server: ServerFactory) -> ServerProc:
    return await start_server()


