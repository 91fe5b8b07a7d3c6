"""SVC_RESTART and TASK_QUERY: allowlisted service restarts as per-session async tasks.

A task is recorded before its child starts and awaited by a Trio task (no
SIGCHLD race); it has a real timeout (the child is killed); its result is kept
for ``task_ttl`` seconds after it finished. Handles are unguessable and belong
to the session that made them: any other session gets ``unknown``, exactly as
for a handle that never existed.
"""

from __future__ import annotations

import enum
import re
import secrets
import shutil
import subprocess
import time
from typing import Any

import attrs
import trio

from .base import SW, AsysError, Context, Instruction, SessionScope

_SERVICE = re.compile(r"[a-z0-9_][a-z0-9_.@-]{0,63}")
_TASKS = "tasks"


class TaskState(enum.StrEnum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"  # no such handle (never issued, or expired)


@attrs.define(eq=False)
class Task:
    handle: str
    service: str
    state: TaskState = TaskState.PENDING
    exit_code: int | None = None
    stderr: str = ""
    started_ns: int = attrs.field(factory=time.time_ns)
    finished_ns: int | None = None
    finished_at: float | None = None  # trio clock, for expiry

    def view(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "service": self.service,
            "state": self.state,
            "exit_code": self.exit_code,
            "stderr": self.stderr,
            "started_ns": self.started_ns,
            "finished_ns": self.finished_ns,
            "duration_ms": (self.finished_ns - self.started_ns) // 1_000_000
            if self.finished_ns
            else None,
        }


def book(scope: SessionScope) -> dict[str, Task]:
    tasks: dict[str, Task] = scope.extras.setdefault(_TASKS, {})
    return tasks


def sweep(tasks: dict[str, Task], ttl: float) -> None:
    """Forget results older than ``ttl`` seconds after completion (never pending ones)."""
    now = trio.current_time()
    for handle in [
        h for h, t in tasks.items() if t.finished_at is not None and now - t.finished_at > ttl
    ]:
        del tasks[handle]


@attrs.frozen
class ServiceArgs:
    service: str


def validate_service(name: str) -> None:
    if not _SERVICE.fullmatch(name) or name.endswith(".service"):
        raise AsysError(
            SW.WRONG_DATA,
            f"invalid service name {name!r}: 1-64 of [a-z0-9_.@-], not starting with - or ., "
            "without the .service suffix",
        )


async def _run(ctx: Context, task: Task, argv: list[str]) -> None:
    config = ctx.server.config
    with trio.move_on_after(config.svc_timeout) as timer:
        result = await trio.run_process(
            argv,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            env={"PATH": ctx.server.path, "LANG": "C"},
        )
    task.finished_ns = time.time_ns()
    task.finished_at = trio.current_time()
    if timer.cancelled_caught:
        task.state = TaskState.TIMEOUT
    else:
        task.exit_code = result.returncode
        task.state = TaskState.SUCCESS if result.returncode == 0 else TaskState.FAILED
        task.stderr = result.stderr.decode("utf-8", "replace")[-500:]
    ctx.bind_audit().note(
        "asys_task_done",
        source="system",
        content=f"SVC_RESTART {task.service}: {task.state}",
        metadata={"handle": task.handle, "exit_code": task.exit_code, "argv": argv},
    )


async def svc_restart(ctx: Context, args: ServiceArgs) -> dict[str, Any]:
    scope = ctx.session
    assert scope is not None
    config = ctx.server.config
    validate_service(args.service)
    if args.service not in config.svc_allowlist:
        if not config.svc_allowlist:
            raise AsysError(
                SW.DENIED, "SVC_RESTART is disabled: the server's svc_allowlist is empty"
            )
        raise AsysError(SW.DENIED, f"service {args.service!r} is not in the server's svc_allowlist")
    tasks = book(scope)
    sweep(tasks, config.task_ttl)
    for task in tasks.values():
        if task.service == args.service and task.state is TaskState.PENDING:
            return {**task.view(), "deduplicated": True}
    if len(tasks) >= config.task_quota:
        raise AsysError(
            SW.BLOCKED,
            f"this session already holds {len(tasks)} tasks "
            f"(quota {config.task_quota}); query or wait for them to expire",
        )
    systemctl = shutil.which("systemctl", path=ctx.server.path)
    if systemctl is None:
        raise AsysError(SW.NOT_SUPPORTED, "systemctl is not installed on this machine")
    task = Task(handle=secrets.token_urlsafe(12), service=args.service)
    tasks[task.handle] = task
    ctx.server.nursery.start_soon(
        _run, ctx, task, [systemctl, "restart", "--", f"{args.service}.service"]
    )
    return {**task.view(), "deduplicated": False}


@attrs.frozen
class HandleArgs:
    handle: str


async def task_query(ctx: Context, args: HandleArgs) -> dict[str, Any]:
    scope = ctx.session
    assert scope is not None
    tasks = book(scope)
    sweep(tasks, ctx.server.config.task_ttl)
    task = tasks.get(args.handle)
    if task is None:
        return {"handle": args.handle, "state": TaskState.UNKNOWN}
    return task.view()


INSTRUCTIONS = (
    Instruction(
        "SVC_RESTART",
        svc_restart,
        ServiceArgs,
        read_only=False,
        needs_session=True,
        summary="restart an allowlisted systemd service; answers a task handle",
    ),
    Instruction(
        "TASK_QUERY",
        task_query,
        HandleArgs,
        read_only=True,
        needs_session=True,
        summary="the state of a task handle of this session",
    ),
)
