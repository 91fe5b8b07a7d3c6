"""Spawn plans, the audit writer and init's rendering: pure or local, no server."""

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from aaau import provision
from aaau.audit import AuditLog, decode_content, encode_bytes
from aaau.config import Config, ConfigError, IdentityMode, load
from aaau.identities import Account
from aaau.messages import Role
from aaau.spawn import SpawnError, plan
from tests.helpers import read_audit

AGENT = Account("agent-03", 990, 990, "/var/lib/aaau/agent-03", "/bin/bash")


def test_plan_environment_is_built_from_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_SECRET", "x")
    p = plan(
        Config(),
        AGENT,
        session_id="sid",
        argv=("claude", "--x"),
        term="xterm",
        cwd=None,
        extra_env={"API_KEY": "k"},
    )
    assert p.env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "API_KEY": "k",
        "HOME": "/var/lib/aaau/agent-03",
        "USER": "agent-03",
        "LOGNAME": "agent-03",
        "SHELL": "/bin/bash",
        "TERM": "xterm",
        "AAAU_SESSION_ID": "sid",
    }
    assert p.argv == ("claude", "--x")
    assert p.executable == "claude"
    assert p.cwd == "/var/lib/aaau/agent-03"
    assert (p.uid, p.gid) == (990, 990)


def test_plan_carries_the_sessions_caps_and_sandbox() -> None:
    cfg = Config(session_pids_max=100, session_memory_max=0, session_nofile=64, sessions_per_user=3)
    p = plan(cfg, AGENT, session_id="s", argv=("x",), term="xterm", cwd=None, extra_env={})
    assert (p.pids_max, p.memory_max) == (100, None)  # memory 0: no cap
    assert p.rlimits == {"RLIMIT_NPROC": 300, "RLIMIT_NOFILE": 64}  # 3 sessions of one member
    assert p.sandbox == {"private_tmp": True, "hide_processes": True, "confine": True}
    ephemeral = plan(
        attrs.evolve(cfg, identity=IdentityMode.SESSION),
        AGENT,
        session_id="s",
        argv=("x",),
        term="xterm",
        cwd=None,
        extra_env={},
    )
    assert ephemeral.rlimits["RLIMIT_NPROC"] == 100


def test_default_program_is_the_agents_login_shell() -> None:
    p = plan(Config(), AGENT, session_id="s", argv=None, term="xterm", cwd=None, extra_env={})
    assert (p.executable, p.argv) == ("/bin/bash", ("-bash",))


def test_configured_default_program() -> None:
    p = plan(
        Config(default_program=("zsh", "-l")),
        AGENT,
        session_id="s",
        argv=None,
        term="xterm",
        cwd="/srv",
        extra_env={},
    )
    assert (p.executable, p.argv, p.cwd) == ("zsh", ("zsh", "-l"), "/srv")


def test_client_may_not_override_identity_variables() -> None:
    with pytest.raises(SpawnError, match="HOME"):
        plan(
            Config(),
            AGENT,
            session_id="s",
            argv=None,
            term="x",
            cwd=None,
            extra_env={"HOME": "/root"},
        )


def test_root_agent_is_refused() -> None:
    root = Account("root", 0, 0, "/root", "/bin/bash")
    with pytest.raises(SpawnError, match="root"):
        plan(Config(), root, session_id="s", argv=None, term="x", cwd=None, extra_env={})


def test_audit_records_are_whole_json_lines_with_private_mode(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    log.write(
        "session_start",
        user="alice",
        uid=1000,
        role=Role.ADMIN,
        session_id="s",
        content="x",
        metadata={"k": 1},
    )
    log.write_bytes("output", b"\xff\x00ok", source="agent", session_id="s")
    log.close()
    first, second = read_audit(tmp_path / "audit.jsonl")
    assert set(first) == {
        "timestamp",
        "seq",
        "host",
        "source",
        "user",
        "uid",
        "role",
        "session_id",
        "command_type",
        "content",
        "metadata",
        "hash",
    }
    assert first["role"] == "admin" and first["seq"] == 1 and second["seq"] == 2
    assert isinstance(first["timestamp"], float)
    assert second["metadata"] == {"encoding": "base64", "bytes": 4}
    assert base64.b64decode(second["content"]) == b"\xff\x00ok"
    assert stat.S_IMODE(os.stat(tmp_path / "audit.jsonl").st_mode) == 0o640


@pytest.mark.parametrize("data", [b"plain \x1b[1mtext\r\n", b"\xe2\x82", "é".encode(), b""])
def test_terminal_bytes_are_stored_losslessly(data: bytes) -> None:
    assert decode_content(*encode_bytes(data)) == data


def test_config_file_is_strict(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('max_sessions = 3\ndefault_program = ["zsh", "-l"]\n')
    assert load(good).max_sessions == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('max_sessions = "3"\n')
    with pytest.raises(ConfigError, match="max_sessions"):
        load(bad)
    extra = tmp_path / "extra.toml"
    extra.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        load(extra)


def test_config_refuses_inconsistent_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="client_queue_bytes"):
        Config(client_queue_bytes=1024, scrollback_bytes=4096)
    with pytest.raises(ValueError, match="max_sessions must be positive"):
        Config().with_overrides(max_sessions=0)
    bad = tmp_path / "limits.toml"
    bad.write_text("client_queue_bytes = 1000\n")
    with pytest.raises(ConfigError, match="client_queue_bytes"):
        load(bad)


def test_init_renders_names_into_the_shipped_templates() -> None:
    layout = provision.Layout(
        agent_user="bot",
        group="humans",
        admin_group="bosses",
        socket="/run/x/s.sock",
        log_dir="/var/log/x",
        agents=3,
    )
    sysusers = provision.render_sysusers(layout)
    assert "g humans -" in sysusers and "g bosses -" in sysusers
    users = [line for line in sysusers.splitlines() if line.startswith("u ")]
    assert users == [
        f"u {name} - 'aaau agent {name}' /var/lib/aaau/{name} /bin/bash"
        for name in ("bot", "bot-01", "bot-02", "bot-03")
    ]
    tmpfiles = provision.render_tmpfiles(layout)
    assert "d /run/x 0750 root humans -" in tmpfiles
    assert "d /var/log/x 0750 root bosses -" in tmpfiles
    for name in ("bot", "bot-01", "bot-02", "bot-03"):
        assert f"d /var/lib/aaau/{name} 0700 {name} {name} -" in tmpfiles


def test_init_refuses_an_agent_named_like_a_group() -> None:
    with pytest.raises(provision.InitError, match="need different names"):
        provision._check(provision.Layout(agent_user="aaau"))
    with pytest.raises(provision.InitError, match="need different names"):  # aaau-01 is a pool user
        provision._check(provision.Layout(agent_user="aaau", group="aaau-01"))


def test_bound_audit_fills_in_who_and_never_changes_in_place(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    session = log.bind(session_id="s1")
    client = session.bind(source="human", user="alice", uid=7, role=Role.ADMIN, client_id=3)
    client.write("input", content="x", metadata={"extra": 1})
    session.write("session_end", content="done")
    client.bind(role=Role.READONLY).write("role_changed", source="system")
    records = read_audit(tmp_path / "audit.jsonl")
    first, second, third = records
    assert (first["user"], first["uid"], first["role"], first["session_id"]) == (
        "alice",
        7,
        "admin",
        "s1",
    )
    assert first["source"] == "human" and first["metadata"] == {"client_id": 3, "extra": 1}
    assert (second["user"], second["role"], second["metadata"]) == ("-", None, {})
    assert (third["role"], third["source"], third["metadata"]) == (
        "readonly",
        "system",
        {"client_id": 3},
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="the check is root's: root reads the file")
def test_a_config_file_others_could_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "aaau.toml"
    path.write_text("max_sessions = 3\n")
    path.chmod(0o664)
    with pytest.raises(ConfigError, match=r"writable by someone other than root.*chmod go-w"):
        load(path)
    path.chmod(0o644)
    os.chown(path, 65534, 0)
    with pytest.raises(ConfigError, match="owner uid 65534"):
        load(path)


def _check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "aaau",
            "server",
            "check-config",
            "--group",
            "root",
            "--admin-group",
            "root",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_check_config_prints_the_settings_with_the_flags_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "aaau.toml"
    path.write_text('max_sessions = 3\nsvc_allowlist = ["cron"]\n')
    result = _check_config(
        "--config", str(path), "--svc-allow", "nginx", "--asys-grant", "sys_procs=dev,ops", "--json"
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["config_file"] == str(path) and found["problems"] == []
    settings = found["settings"]
    assert settings["max_sessions"] == 3 and settings["svc_allowlist"] == ["nginx"]
    assert settings["asys_grants"] == {"SYS_PROCS": ["dev", "ops"]}


def test_check_config_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "aaau.toml"
    path.write_text('max_sessions = "many"\n')
    result = _check_config("--config", str(path))
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.startswith(f"aaau-server: invalid config {path}:")
    assert "max_sessions" in result.stderr
    missing = _check_config("--group", "aaut-no-such-group")
    assert missing.returncode == 1
    assert "group aaut-no-such-group does not exist" in missing.stderr
    flag = _check_config("--asys-grant", "SYS_PROCS")
    assert flag.returncode == 2 and "INSTRUCTION=GROUP[,GROUP]" in flag.stderr
