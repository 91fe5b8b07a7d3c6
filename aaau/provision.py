"""``aaau-server init``: the agent user, the groups, the directories, the PAM service.

Idempotent. The package's templates (``aaau/templates/sysusers.conf``, ``logrotate.conf`` and
``tmpfiles.conf``, read with :mod:`importlib.resources`) are rendered with the
chosen names, installed under /etc with a name of this instance's own
(``aaau.conf``, or ``aaau-GROUP.conf`` for another group) so that /run/aaau
returns at boot, and applied with ``systemd-sysusers`` and ``systemd-tmpfiles``
(or ``groupadd``/``useradd``/mkdir where those are missing).

tmpfiles lines are written only for directories aaau owns: one that does not
exist yet, or that this instance's conf already lists. An existing directory
that is not aaau's (``/run`` for ``--socket /run/aaau.sock``, ``/tmp``, a
home) gets no line: tmpfiles would otherwise take it over at every boot. The
server checks such directories itself at start (:mod:`aaau.paths`).
"""

from __future__ import annotations

import grp
import importlib.resources
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs

from .identities import pool_names

PAM_SERVICE_TEXT = """\
# aaau: the PAM session opened for every agent the aaau server starts.
# Only root (the aaau server's launcher) can authenticate here; the session stack
# applies /etc/security/limits.conf to the agent user (pam_limits).
auth     required  pam_rootok.so
account  required  pam_permit.so
session  required  pam_limits.so
session  optional  pam_unix.so
"""


class InitError(Exception):
    pass


@attrs.frozen
class Layout:
    agent_user: str = "agent"
    group: str = "aaau"
    admin_group: str = "aaau-admin"
    socket: str = "/run/aaau/aaau.sock"
    log_dir: str = "/var/log/aaau"
    home: str | None = None
    sysconf_dir: str = "/etc"
    #: where completions and man pages go (the local administrator's share, on every
    #: shell's and man's search path)
    share_dir: str = "/usr/local/share"
    pam_service: str = "aaau"
    #: pool users {agent_user}-01 ... (one per member, or per session; docs/operating.md)
    agents: int = 32

    @property
    def agent_home(self) -> str:
        return self.home or f"/var/lib/aaau/{self.agent_user}"

    @property
    def pool(self) -> list[str]:
        return pool_names(self.agent_user, self.agents)

    @property
    def conf_name(self) -> str:
        """This instance's file name in sysusers.d and tmpfiles.d."""
        return "aaau.conf" if self.group == "aaau" else f"aaau-{self.group}.conf"

    def home_of(self, user: str) -> str:
        """The shared agent user's home, or a pool user's beside it."""
        if user == self.agent_user:
            return self.agent_home
        return os.path.join(os.path.dirname(self.agent_home), user)


def _template(name: str) -> str:
    """A template shipped in the package (aaau/templates)."""
    return (importlib.resources.files("aaau") / "templates" / name).read_text()


def _listed_in(tmpfiles: str) -> set[str]:
    """The paths that tmpfiles.d text has lines for."""
    return {
        shlex.split(line)[1]
        for line in tmpfiles.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }


def _listed(conf: Path) -> set[str]:
    """The paths this instance's installed tmpfiles conf already owns."""
    try:
        return _listed_in(conf.read_text())
    except FileNotFoundError:
        return set()


def _render(text: str, substitute: Callable[[list[str]], list[list[str]]]) -> str:
    """The template with each entry line replaced by the lines ``substitute`` makes of it."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            out.append(line)
            continue
        for fields in substitute(shlex.split(line)):
            out.append(" ".join(shlex.quote(f) if f != "-" else f for f in fields))
    return "\n".join(out) + "\n"


def render_sysusers(layout: Layout) -> str:
    names = {"aaau": layout.group, "aaau-admin": layout.admin_group}

    def sub(fields: list[str]) -> list[list[str]]:
        if fields[0] == "u" and fields[1] == "agent":  # the shared agent user, then the pool
            users = [layout.agent_user, *layout.pool]
            return [
                ["u", user, "-", f"aaau agent {user}", layout.home_of(user), *fields[5:]]
                for user in users
            ]
        fields[1] = names.get(fields[1], fields[1])
        return [fields]

    return _render(_template("sysusers.conf"), sub)


def render_tmpfiles(layout: Layout, ours: Callable[[str], bool] = lambda _path: True) -> str:
    """tmpfiles.d lines for the directories ``ours`` says are aaau's."""
    paths = {
        "/run/aaau": os.path.dirname(layout.socket),
        "/var/log/aaau": layout.log_dir,
        "/var/lib/aaau": os.path.dirname(layout.agent_home),
    }
    names = {"aaau": layout.group, "aaau-admin": layout.admin_group}

    def sub(fields: list[str]) -> list[list[str]]:
        if fields[1] == "/var/lib/aaau/agent":  # a private home for every agent user
            homes = [
                [fields[0], layout.home_of(user), fields[2], user, user, *fields[5:]]
                for user in [layout.agent_user, *layout.pool]
            ]
            return [line for line in homes if ours(line[1])]
        fields[1] = paths.get(fields[1], fields[1])
        if fields[0].startswith("a"):  # an ACL: group:aaau-admin:r-x
            fields[6] = fields[6].replace(":aaau-admin:", f":{layout.admin_group}:")
        fields[3] = names.get(fields[3], fields[3])
        fields[4] = names.get(fields[4], fields[4])
        return [fields] if ours(fields[1]) else []

    return _render(_template("tmpfiles.conf"), sub)


def server_program() -> str:
    """The ``aaau-server`` a unit runs: on PATH, else beside this Python (a venv)."""
    found = shutil.which("aaau-server")
    if found is None:
        beside = os.path.join(os.path.dirname(sys.executable), "aaau-server")
        found = beside if os.access(beside, os.X_OK) else "/usr/local/bin/aaau-server"
    return os.path.abspath(found)


def run_options(layout: Layout) -> list[str]:
    """The ``aaau-server run`` options that repeat what init was given (non-defaults)."""
    default = Layout()
    options = []
    for name, flag in (
        ("agent_user", "--agent-user"),
        ("agents", "--agents"),
        ("pam_service", "--pam-service"),
        ("group", "--group"),
        ("admin_group", "--admin-group"),
        ("socket", "--socket"),
        ("log_dir", "--log-dir"),
    ):
        value = getattr(layout, name)
        if value != getattr(default, name):
            options += [flag, str(value)]
    return options


def unit_name(layout: Layout) -> str:
    """This instance's unit name: ``aaau``, or ``aaau-GROUP`` for another group."""
    return layout.conf_name.removesuffix(".conf")


def render_units(
    layout: Layout, program: str | None = None, *, gated: bool = True
) -> dict[str, str]:
    """``{file name: text}`` of the service and socket units for this instance.

    ``gated``: the socket's directory is aaau's (tmpfiles makes it ``root:GROUP
    0750`` with the admins' ACL), so the socket itself may be ``0666``; else it
    is ``0660 root:GROUP`` (a directory such as /run lets everyone through).
    """
    name = unit_name(layout)
    command = shlex.join([program or server_program(), "run", *run_options(layout)])
    service = _template("aaau.service")
    service = service.replace("ExecStart=/usr/local/bin/aaau-server run", f"ExecStart={command}")
    service = service.replace(
        "Requires=aaau.socket\nAfter=aaau.socket", f"Requires={name}.socket\nAfter={name}.socket"
    )
    socket_unit = _template("aaau.socket")
    socket_unit = socket_unit.replace(
        "ListenStream=/run/aaau/aaau.sock", f"ListenStream={layout.socket}"
    )
    socket_unit = socket_unit.replace("SocketGroup=aaau", f"SocketGroup={layout.group}")
    if not gated:
        socket_unit = socket_unit.replace("SocketMode=0666", "SocketMode=0660")
    return {f"{name}.service": service, f"{name}.socket": socket_unit}


def render_logrotate(layout: Layout) -> str:
    """logrotate's file for this instance: its log directory, its admins' group."""
    log_dir = layout.log_dir.rstrip("/") or "/"
    text = _template("logrotate.conf")
    text = text.replace("\n/var/log/aaau/", f"\n{os.path.join(log_dir, '')}")
    return text.replace("create 0640 root aaau-admin", f"create 0640 root {layout.admin_group}")


#: package data -> where it goes under share_dir
_SHARED = {
    "completion/aaau.bash": "bash-completion/completions/aaau",
    "completion/aaau-server.bash": "bash-completion/completions/aaau-server",
    "completion/_aaau": "zsh/site-functions/_aaau",
    "completion/_aaau-server": "zsh/site-functions/_aaau-server",
    "completion/aaau.fish": "fish/vendor_completions.d/aaau.fish",
    "completion/aaau-server.fish": "fish/vendor_completions.d/aaau-server.fish",
    "man/aaau.1": "man/man1/aaau.1",
    "man/aaau-server.8": "man/man8/aaau-server.8",
}


def _install_shared(layout: Layout) -> dict[str, str]:
    """Completions and man pages (generated from the parsers: tools/docgen.py)."""
    data = importlib.resources.files("aaau") / "data"
    written = {}
    for source, target in _SHARED.items():
        path = Path(layout.share_dir) / target
        written[str(path)] = _write(path, (data / source).read_text(), 0o644)
    return written


def _exists_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _exists_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _check(layout: Layout) -> None:
    agents = [layout.agent_user, *layout.pool]
    if len({*agents, layout.group, layout.admin_group}) != len(agents) + 2:
        raise InitError(
            "the agent users, the group and the admin group need different names "
            "(each agent user's own group is named after it)"
        )
    for user in agents:
        if not _exists_user(user):
            continue
        pw = pwd.getpwnam(user)
        if pw.pw_uid == 0 or pw.pw_gid == 0:
            raise InitError(f"user {user} is root: choose an unprivileged agent user")
        gids = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
        for name in (layout.group, layout.admin_group):
            if _exists_group(name) and grp.getgrnam(name).gr_gid in gids:
                raise InitError(
                    f"user {user} is a member of {name}: an agent user must never be in the "
                    f"human or admin group (remove it: gpasswd -d {user} {name})"
                )


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InitError(f"{shlex.join(argv)} failed: {result.stderr.strip()}")


def _apply_sysusers(layout: Layout, conf: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool:
        _run([tool, str(conf)])
        return
    for name in (layout.group, layout.admin_group):
        if not _exists_group(name):
            _run(["groupadd", "--system", name])
    for user in (layout.agent_user, *layout.pool):
        if not _exists_user(user):
            _run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--home-dir",
                    layout.home_of(user),
                    "--no-create-home",
                    "--shell",
                    "/bin/bash",
                    "--comment",
                    f"aaau agent {user}",
                    user,
                ]
            )


def _apply_tmpfiles(text: str, conf: Path) -> None:
    tool = shutil.which("systemd-tmpfiles")
    if tool:
        _run([tool, "--create", str(conf)])
        return
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        _, path, mode, user, group, _ = shlex.split(line)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, int(mode, 8))
        os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)


def _write(path: Path, text: str, mode: int) -> str:
    """Write ``text`` to ``path``: 'created', 'updated' or 'unchanged'."""
    if path.exists() and path.read_text() == text:
        return "unchanged"
    state = "updated" if path.exists() else "created"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return state


def init(layout: Layout, out: Callable[[str], None] = print) -> None:
    if os.geteuid() != 0:
        raise InitError("aaau-server init must be run as root")
    _check(layout)
    pool = layout.pool
    before = {
        f"group {layout.group}": _exists_group(layout.group),
        f"group {layout.admin_group}": _exists_group(layout.admin_group),
        f"user {layout.agent_user}": _exists_user(layout.agent_user),
        f"agent users {pool[0]} ... {pool[-1]}": all(map(_exists_user, pool)),
    }
    dirs = [os.path.dirname(layout.socket), layout.log_dir, layout.agent_home]
    before.update({f"directory {d}": os.path.isdir(d) for d in dirs})

    etc = Path(layout.sysconf_dir)
    sysusers_conf = etc / "sysusers.d" / layout.conf_name
    tmpfiles_conf = etc / "tmpfiles.d" / layout.conf_name
    logrotate_conf = etc / "logrotate.d" / layout.conf_name.removesuffix(".conf")
    listed = _listed(tmpfiles_conf)
    sysusers = render_sysusers(layout)
    tmpfiles = render_tmpfiles(layout, lambda path: not os.path.lexists(path) or path in listed)
    written = {
        str(sysusers_conf): _write(sysusers_conf, sysusers, 0o644),
        str(tmpfiles_conf): _write(tmpfiles_conf, tmpfiles, 0o644),
        str(logrotate_conf): _write(logrotate_conf, render_logrotate(layout), 0o644),
        **{
            str(etc / "systemd" / "system" / file): _write(
                etc / "systemd" / "system" / file, text, 0o644
            )
            for file, text in render_units(
                layout, gated=os.path.dirname(layout.socket) in _listed_in(tmpfiles)
            ).items()
        },
        # PAM only looks in /etc/pam.d, whatever --sysconf-dir says
        f"/etc/pam.d/{layout.pam_service}": _write(
            Path("/etc/pam.d") / layout.pam_service, PAM_SERVICE_TEXT, 0o644
        ),
    }
    written.update(_install_shared(layout))
    _apply_sysusers(layout, sysusers_conf)
    _check(layout)  # the agent user exists now: check its groups again
    _apply_tmpfiles(tmpfiles, tmpfiles_conf)

    for thing, existed in before.items():
        out(f"{'exists ' if existed else 'created'} {thing}")
    for path, state in written.items():
        out(f"{state:9} {path}".replace("unchanged", "exists   "))
    for directory in sorted(set(dirs) - _listed_in(tmpfiles)):
        out(f"not ours  {directory} (it existed before: aaau-server run checks it at start)")
    out("")
    out("Next: add the people who may use agents to the group, then start the server:")
    out(f"  usermod -aG {layout.group} NAME      (admins: usermod -aG {layout.admin_group} NAME)")
    name = unit_name(layout)
    if os.path.isdir("/run/systemd/system"):  # systemd is the init system
        out(f"  systemctl daemon-reload && systemctl enable --now {name}.socket {name}.service")
    else:
        out(f"  {shlex.join(['aaau-server', 'run', '--daemon', *run_options(layout)])}")
        out(
            f"  (no systemd here: {name}.service and {name}.socket are installed for when there is)"
        )
