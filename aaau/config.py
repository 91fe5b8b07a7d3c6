"""The server's configuration: defaults, a TOML file, and command-line overrides."""

from __future__ import annotations

import enum
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs

from . import codec
from .journal import SOCKET as JOURNAL_SOCKET
from .journal import Mode as JournalMode


class IdentityMode(enum.StrEnum):
    """Which user an agent runs as (see docs/operating.md, "Security model")."""

    MEMBER = "member"  # one agent user per member, from the pool, kept across sessions
    SESSION = "session"  # a fresh pool user per session, its home emptied at the end
    SHARED = "shared"  # every session as agent_user: no isolation between members


class Audience(enum.StrEnum):
    """Which clients receive a kind of escape sequence (the output filter)."""

    ALL = "all"
    INTERACTIVE = "interactive"  # Interactive and Admin clients, not ReadOnly observers
    #: one Interactive (or Admin) client: the one who typed last (before anyone typed, the
    #: first attached), so that a terminal query gets one answer, not one per person
    TYPIST = "typist"
    NONE = "none"


@attrs.frozen
class Config:
    """Everything the server reads at start and again on SIGHUP.

    ``agent_user``, ``identity``, ``agent_pool``, ``state_dir``, ``socket`` and
    ``log_dir`` take effect at start only; the limits, ``default_program`` and
    group names are re-read on SIGHUP.
    """

    #: the shared agent user (identity "shared"), and the prefix of the pool users
    #: ``{agent_user}-01`` ... that ``aaau-server init --agents N`` provisions
    agent_user: str = "agent"
    identity: IdentityMode = attrs.field(default=IdentityMode.MEMBER, converter=IdentityMode)
    #: how many pool users there are (init makes them; the server uses those that exist)
    agent_pool: int = 32
    #: root's own state: which member has which pool user (identities.json)
    state_dir: str = "/var/lib/aaau"
    #: sessions' cgroups live in ``<hierarchy>/<cgroup_base>/<session>``
    cgroup_base: str = "aaau"
    group: str = "aaau"
    admin_group: str = "aaau-admin"
    socket: str = "/run/aaau/aaau.sock"
    log_dir: str = "/var/log/aaau"
    pam_service: str = "aaau"
    #: argv run when a client names no program; empty: the agent's login shell.
    default_program: tuple[str, ...] = ()
    path: str = "/usr/local/bin:/usr/bin:/bin"
    lang: str = "C.UTF-8"
    handshake_timeout: float = 5.0
    max_frame: int = 1 << 20
    #: the largest hello (first frame): a create with its argv and environment
    max_hello: int = 16 * 1024
    #: connections: per person, per person before their hello, and in all
    connections_per_user: int = 64
    hellos_per_user: int = 8
    max_connections: int = 4096
    clients_per_session: int = 16
    #: of a session's places, how many only its creator and admins may take
    reserved_clients: int = 2
    #: clients one person (not the creator, not an admin) may have in one session
    observers_per_user: int = 4
    max_sessions: int = 64
    sessions_per_user: int = 8
    #: input a client may have in flight before the server credits it back
    input_window: int = 256 * 1024
    #: control messages one attached client may send: per second, and in a burst
    control_rate: float = 50.0
    control_burst: int = 200
    scrollback_bytes: int = 256 * 1024
    client_queue_bytes: int = 4 << 20
    kill_grace: float = 2.0
    shutdown_grace: float = 5.0
    record_output: bool = True
    #: the output one session may record: bytes/s, bursts, in all (0: no total)
    record_output_rate: int = 4 << 20
    record_output_burst: int = 64 << 20
    record_output_max: int = 1 << 30
    #: a copy of every audit record in the journal (aaau/journal.py): "off", "events"
    #: (all but terminal output) or "all"; journal_socket: journald's native socket
    journald: JournalMode = attrs.field(default=JournalMode.OFF, converter=JournalMode)
    journal_socket: str = JOURNAL_SOCKET
    #: per-session caps: processes (pids cgroup; RLIMIT_NPROC for the identity as a
    #: backstop), memory in bytes (memory cgroup; 0: none), open files per process
    session_pids_max: int = 512
    session_memory_max: int = 4 << 30
    session_nofile: int = 4096
    #: the agent's sandbox: its own /tmp, /var/tmp and /dev/shm; a /proc that shows
    #: only its identity's processes; no signals, ptrace or abstract-socket connects
    #: out of its session (Landlock), no privilege gain (no_new_privs)
    private_tmp: bool = True
    hide_processes: bool = True
    confine: bool = True
    #: the output filter: who receives clipboard writes (OSC 52), clipboard queries
    #: (which would send a person's clipboard to the agent), terminal queries (which
    #: make a terminal answer on its input), window titles, hyperlinks (OSC 8)
    clipboard_writes_to: Audience = attrs.field(default=Audience.INTERACTIVE, converter=Audience)
    clipboard_queries_to: Audience = attrs.field(default=Audience.NONE, converter=Audience)
    terminal_queries_to: Audience = attrs.field(default=Audience.TYPIST, converter=Audience)
    titles_to: Audience = attrs.field(default=Audience.ALL, converter=Audience)
    hyperlinks_to: Audience = attrs.field(default=Audience.ALL, converter=Audience)
    #: the screen model (what joiners see): fed screen_rate bytes/s (bursts of
    #: screen_burst) from a backlog of at most screen_backlog bytes, all of it before a
    #: join; output faster for longer makes it stale (see aaau/screen.py).
    #: screen_history: the lines above the screen a joiner gets
    screen_rate: int = 2 * 1024 * 1024
    screen_burst: int = 256 * 1024
    screen_backlog: int = 1024 * 1024
    screen_history: int = 500
    #: ASys: services SVC_RESTART may restart (empty: SVC_RESTART is refused)
    svc_allowlist: tuple[str, ...] = ()
    #: ASys: instruction -> groups whose Interactive members may use it (Admins always may)
    asys_grants: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    svc_timeout: float = 60.0
    task_quota: int = 8
    task_ttl: float = 300.0
    #: ASys for the agent (docs/asys.md): the directory of the sessions' endpoints
    #: ("": beside the socket's directory, ``/run/aaau`` -> ``/run/aaau-asys``);
    #: instruction -> groups whose members may grant it to their agents (root and
    #: admins may grant any; the read-only instructions anyone may)
    asys_dir: str = ""
    agent_grants: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: the calls one session's agent may make: per second, and in a burst
    agent_asys_rate: float = 20.0
    agent_asys_burst: int = 40
    #: connections one session's endpoint serves at once (``aaau asys``, MCP servers)
    agent_endpoint_connections: int = 8
    #: serve MCP on the endpoints (``aaau mcp``) and register it with claude and codex
    mcp: bool = True

    @property
    def endpoint_dir(self) -> str:
        """Where the sessions' ASys endpoints are (see ``asys_dir``)."""
        if self.asys_dir:
            return self.asys_dir
        parent = os.path.dirname(os.path.abspath(self.socket))
        return parent.rstrip("/") + "-asys"

    def __attrs_post_init__(self) -> None:
        if self.client_queue_bytes < self.scrollback_bytes + 65536:
            raise ValueError(
                "client_queue_bytes must exceed scrollback_bytes by at least 64 KiB: a joining "
                "client gets the whole scrollback at once"
            )
        for name in (
            "agent_pool",
            "session_pids_max",
            "session_nofile",
            "handshake_timeout",
            "max_frame",
            "max_hello",
            "connections_per_user",
            "hellos_per_user",
            "max_connections",
            "observers_per_user",
            "input_window",
            "control_rate",
            "control_burst",
            "record_output_rate",
            "record_output_burst",
            "clients_per_session",
            "max_sessions",
            "sessions_per_user",
            "kill_grace",
            "task_quota",
            "agent_asys_rate",
            "agent_asys_burst",
            "agent_endpoint_connections",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.session_memory_max < 0 or self.record_output_max < 0:
            raise ValueError("session_memory_max and record_output_max: 0 (none) or positive")
        if not 0 <= self.reserved_clients < self.clients_per_session:
            raise ValueError("reserved_clients must be less than clients_per_session")

    def with_overrides(self, **overrides: Any) -> Config:
        """A copy with every override that is not None applied."""
        return attrs.evolve(self, **{k: v for k, v in overrides.items() if v is not None})


class ConfigError(Exception):
    pass


#: the configuration read when no --config is given, if it exists
DEFAULT_PATH = "/etc/aaau/aaau.toml"


def default_path(given: str | None) -> str | None:
    """``given``, else :data:`DEFAULT_PATH` if it exists, else None (the defaults)."""
    if given is not None:
        return given
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def load(path: str | Path | None) -> Config:
    """The configuration in ``path`` (a TOML table of Config's fields), or defaults.

    Root reads it, so, as sshd does, it must be root's and writable by root
    only: anyone who could write it could choose the agents' program.
    """
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & 0o022):
                raise ConfigError(
                    f"config {path} is writable by someone other than root "
                    f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
                    f"chown root {path} && chmod go-w {path}"
                )
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    data = data.get("server", data)
    try:
        return codec.structure(data, Config)
    except cattrs.BaseValidationError as exc:
        raise ConfigError(f"invalid config {path}: {codec.describe_error(exc)}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from None
