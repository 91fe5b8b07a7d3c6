"""The server as a systemd service, without systemd as PID 1: the units as systemd
judges them, and each thing the units ask of the server done by hand the way systemd
does it: a socket passed as fd 3, READY=1 on $NOTIFY_SOCKET, a delegated cgroup.
Also: admins who are only in the admin group, versions, the wheel."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import aaau
from aaau import acl, provision
from aaau import messages as m
from aaau.cgroups import Hierarchies

from .helpers import (
    ADLER,
    ADMIN_GROUP,
    ALICE,
    CGROUP_BASE,
    GROUP,
    PY,
    ServerFactory,
    ServerProc,
    gid_of,
    root,
    server_env,
    wait_for,
)

V = m.PROTOCOL_VERSION
SERVER = str(Path(PY).parent / "aaau-server")


def _analyze(*args: str, man: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze``; ``man``: where the man pages are (verify runs
    ``man aaau-server(8)`` for the units' ``Documentation=``)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    env = {**os.environ, **({"MANPATH": str(man)} if man else {})}
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, check=False, env=env
    )


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The default instance's units, rendered for this machine's aaau-server, and the
    man page they name, where init puts it (below a share/man of their own)."""
    for name, text in provision.render_units(provision.Layout(), SERVER).items():
        (tmp_path / name).write_text(text)
    page = tmp_path / "man" / "man8" / "aaau-server.8"
    page.parent.mkdir(parents=True)
    page.write_text((Path(aaau.__file__).parent / "data" / "man" / "aaau-server.8").read_text())
    return tmp_path


def test_the_units_pass_verify(units: Path) -> None:
    result = _analyze(
        "verify", str(units / "aaau.service"), str(units / "aaau.socket"), man=units / "man"
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_service_is_exposed_at_most_4_5(units: Path) -> None:
    result = _analyze("security", "--offline=yes", str(units / "aaau.service"))
    found = re.search(r"Overall exposure level for aaau.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    assert float(found.group(1)) <= 4.5, result.stdout


def test_the_units_keep_what_the_server_and_the_agents_need(units: Path) -> None:
    text = (units / "aaau.service").read_text()
    service = "\n".join(x for x in text.splitlines() if not x.startswith("#")) + "\n"
    assert f"ExecStart={SERVER} run\n" in service
    for needed in ("Type=notify", "Delegate=yes", "LimitNOFILE=65536", "KillMode=mixed"):
        assert needed in service
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", service, re.M)
    assert caps is not None
    for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_NET_ADMIN"):
        assert cap in caps.group(1).split()
    # the agents inherit the unit's sandbox: nothing that takes their network or homes
    for never in ("PrivateNetwork=yes", "ProtectHome=", "IPAddressDeny=", "ProtectSystem=strict"):
        assert never not in service
    socket_unit = (units / "aaau.socket").read_text()
    assert "ListenStream=/run/aaau/aaau.sock" in socket_unit and "SocketGroup=aaau" in socket_unit


def test_another_instance_gets_its_own_names_and_options() -> None:
    layout = provision.Layout(group="team", socket="/run/team/aaau.sock", log_dir="/var/log/team")
    units = provision.render_units(layout, "/usr/bin/aaau-server", gated=False)
    service, socket_unit = units["aaau-team.service"], units["aaau-team.socket"]
    assert (
        "ExecStart=/usr/bin/aaau-server run --group team --socket /run/team/aaau.sock "
        "--log-dir /var/log/team\n" in service
    )
    assert "Requires=aaau-team.socket" in service
    assert "ListenStream=/run/team/aaau.sock" in socket_unit and "SocketMode=0660" in socket_unit


@root
def test_init_installs_the_units_and_says_how_to_start_them(
    accounts: dict[str, object], base_dir: Path
) -> None:
    unit_dir = base_dir / "etc" / "systemd" / "system"
    service = (unit_dir / f"aaau-{GROUP}.service").read_text()
    assert f"--socket {base_dir}/init-run/aaau.sock" in service
    assert f"--admin-group {ADMIN_GROUP}" in service
    text = str(accounts["init_output"])
    assert "aaau-server run --daemon --agent-user" in text  # no systemd here: the fallback
    assert f"--group {GROUP}" in text.split("aaau-server run --daemon", 1)[1]
    result = _analyze(
        "verify",
        str(unit_dir / f"aaau-{GROUP}.service"),
        str(unit_dir / f"aaau-{GROUP}.socket"),
        man=base_dir / "share" / "man",  # where init put the pages
    )
    assert result.returncode == 0, result.stderr
    run_dir = base_dir / "init-run"
    assert acl.groups_of(str(run_dir)) == {gid_of(ADMIN_GROUP): 0o5}  # tmpfiles' a+ line


# --- what systemd would do, done by hand ---------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    try:
        yield sock, path
    finally:
        sock.close()


def _activation(fd: int) -> tuple[str, ...]:
    """What systemd does for a socket unit's service: the socket as fd 3, and
    ``$LISTEN_FDS``, ``$LISTEN_PID`` (the server's own pid: it is exec'd, not forked)."""
    code = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
        "os.execvp(sys.argv[2], sys.argv[2:])"
    )
    return (PY, "-c", code, str(fd))


def _messages(sock: socket.socket, until: str) -> list[str]:
    seen: list[str] = []
    while not any(until in x for x in seen):
        seen.append(sock.recv(4096).decode())
    return seen


@root
async def test_the_server_tells_systemd_ready_reloading_and_stopping(
    start_server: ServerFactory, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    srv = await start_server(env={**server_env(), "NOTIFY_SOCKET": path})
    (ready,) = await trio.to_thread.run_sync(_messages, sock, "READY=1")
    assert f"STATUS=listening on {srv.socket}" in ready and f"MAINPID={srv.process.pid}" in ready
    srv.process.send_signal(signal.SIGHUP)
    reload = await trio.to_thread.run_sync(_messages, sock, "READY=1")
    assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and "READY=1" in reload[-1]
    srv.process.send_signal(signal.SIGTERM)
    (stopping,) = await trio.to_thread.run_sync(_messages, sock, "STOPPING=1")
    assert stopping.startswith("STOPPING=1")
    await srv.process.wait()


@root
async def test_a_socket_passed_as_fd_3_is_served_and_left_in_place(
    start_server: ServerFactory, base_dir: Path
) -> None:
    run_dir = base_dir / "activated"
    run_dir.mkdir(mode=0o750)
    os.chown(run_dir, 0, gid_of(GROUP))
    path = run_dir / "aaau.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chown(path, 0, gid_of(GROUP))
    os.chmod(path, 0o660)
    listener.listen(16)
    inode = path.stat().st_ino
    fd = listener.fileno()
    wrapper = _activation(fd)
    try:
        srv = await start_server(socket_path=path, wrapper=wrapper, pass_fds=(fd,))
        alice, _ = await srv.create(ALICE, ("sh", "-c", "echo activated; read x"))
        await alice.expect_output(b"activated")
        await alice.aclose()
        srv.process.send_signal(signal.SIGTERM)
        await srv.process.wait()
        assert path.stat().st_ino == inode  # systemd's socket: not removed, not replaced
        assert acl.groups_of(str(path)) == {gid_of(ADMIN_GROUP): 0o6}
    finally:
        listener.close()


@root
async def test_a_socket_passed_for_another_path_is_refused(
    start_server: ServerFactory, base_dir: Path
) -> None:
    elsewhere = base_dir / "elsewhere.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(elsewhere))
    listener.listen(1)
    fd = listener.fileno()
    wrapper = _activation(fd)
    try:
        srv = await start_server(wrapper=wrapper, pass_fds=(fd,), expect_ready=False)
        assert await srv.process.wait() == 1
        stderr = (srv.log_dir / "server.stderr").read_text()
        assert "make ListenStream= and --socket (socket =) agree" in stderr
    finally:
        listener.close()
        elsewhere.unlink()


@root
async def test_an_admin_only_in_the_admin_group_reaches_the_socket(server: ServerProc) -> None:
    assert acl.groups_of(str(server.socket)) == {gid_of(ADMIN_GROUP): 0o6}
    assert acl.groups_of(str(server.socket.parent)) == {gid_of(ADMIN_GROUP): 0o5}
    assert server.socket.stat().st_mode & 0o777 == 0o660  # the mode is what it was
    peer = await server.peer(ADLER, m.ListSessions(V))
    assert isinstance(await peer.expect(m.Sessions), m.Sessions)


@root
async def test_under_a_delegated_cgroup_the_sessions_live_below_the_unit(
    start_server: ServerFactory,
) -> None:
    mount = Hierarchies.discover().v2_mount
    if mount is None:
        pytest.skip("no cgroup2 here")
    unit = mount / f"{CGROUP_BASE}-unit.service"
    unit.mkdir()
    os.setxattr(unit, "trusted.delegate", b"1")  # what systemd marks Delegate=yes with
    wrapper = ("sh", "-c", f'echo $$ > {unit}/cgroup.procs && exec "$@"', "sh")
    try:
        srv = await start_server(wrapper=wrapper)
        server_cgroup = Path(f"/proc/{srv.process.pid}/cgroup").read_text()
        assert f"0::/{unit.name}/server\n" in server_cgroup
        alice, welcome = await srv.create(ALICE, ("sh", "-c", "echo pid=$$; read x"))
        await alice.until(lambda: re.search(rb"pid=([0-9]+)\r\n", alice.output))
        found = re.search(rb"pid=([0-9]+)\r\n", alice.output)
        assert found is not None
        pid = int(found.group(1))
        agent_cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        assert f"0::/{unit.name}/{CGROUP_BASE}/{welcome.session_id}\n" in agent_cgroup
        await alice.aclose()
        srv.process.send_signal(signal.SIGTERM)
        await srv.process.wait()
    finally:
        for leftover in sorted(unit.rglob("*"), key=lambda p: -len(p.parts)):
            if leftover.is_dir():
                leftover.rmdir()
        await wait_for(lambda: _rmdir(unit))


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# --- versions and the wheel ------------------------------------------------------------------------


@pytest.mark.parametrize("program", [["aaau"], ["aaau", "server"]])
def test_version_on_both_programs(program: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *program, "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    name = "aaau-server" if "server" in program else "aaau"
    assert result.stdout.strip() == f"{name} {aaau.__version__}"


def test_the_wheel_holds_the_templates_the_license_and_one_version(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(repo)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("aaau-*.whl")
    assert wheel.name.startswith(f"aaau-{aaau.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("aaau.service", "aaau.socket", "logrotate.conf", "tmpfiles.conf"):
        assert f"aaau/templates/{template}" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    for data in ("completion/aaau.bash", "completion/_aaau", "completion/aaau.fish", "man/aaau.1",
                 "man/aaau-server.8"):
        assert f"aaau/data/{data}" in names
