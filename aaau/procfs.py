"""Reading machine facts from /proc and /sys: small parsers over text, and their readers.

The parsers are pure (text in, numbers out) so they are tested without a
machine; the ``read_*`` functions are thin and synchronous (procfs reads do
not block on I/O).
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

PF_KTHREAD = 0x00200000
_IFF_LOOPBACK = 0x8


@attrs.frozen
class CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat, in clock ticks."""

    total: int
    idle: int  # idle + iowait
    iowait: int


def parse_cpu_times(stat_text: str) -> CpuTimes:
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:]]
            # user nice system idle iowait irq softirq steal (guest is inside user)
            fields += [0] * (8 - len(fields))
            total = sum(fields[:8])
            return CpuTimes(total=total, idle=fields[3] + fields[4], iowait=fields[4])
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_meminfo(text: str) -> dict[str, int]:
    """Fields of /proc/meminfo in kB."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0])
    return out


def parse_loadavg(text: str) -> tuple[float, float, float]:
    one, five, fifteen = text.split()[:3]
    return float(one), float(five), float(fifteen)


def parse_psi(text: str) -> dict[str, float]:
    """``{"some_avg10": .., "full_avg10": ..}`` from a /proc/pressure file."""
    out = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key == "avg10":
                out[f"{kind}_avg10"] = float(value)
    return out


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """Interface -> (rx_bytes, tx_bytes) from /proc/net/dev."""
    out = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) >= 9:
            out[name.strip()] = (int(fields[0]), int(fields[8]))
    return out


@attrs.frozen
class ProcStat:
    """What SYS_PROCS needs from /proc/<pid>/stat."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    ticks: int  # utime + stime
    starttime: int
    rss_pages: int

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_proc_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat; comm may contain spaces and parentheses."""
    pid_s, _, rest = text.partition(" (")
    comm, _, tail = rest.rpartition(") ")
    f = tail.split()
    # f[0] is field 3 (state); field n is f[n - 3]
    return ProcStat(
        pid=int(pid_s),
        comm=comm,
        state=f[0],
        ppid=int(f[1]),
        pgrp=int(f[2]),
        session=int(f[3]),
        flags=int(f[6]),
        ticks=int(f[11]) + int(f[12]),
        starttime=int(f[19]),
        rss_pages=int(f[21]),
    )


def read_text(path: str | Path) -> str:
    with open(path) as f:
        return f.read()


def read_proc_stat(pid: int) -> ProcStat | None:
    try:
        return parse_proc_stat(read_text(f"/proc/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return None


def proc_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pid_max() -> int:
    try:
        return int(read_text("/proc/sys/kernel/pid_max"))
    except (OSError, ValueError):
        return 4194304


def loopback_interfaces() -> set[str]:
    """Interfaces flagged IFF_LOOPBACK in /sys (not merely named "lo")."""
    out = set()
    try:
        for name in os.listdir("/sys/class/net"):
            try:
                if int(read_text(f"/sys/class/net/{name}/flags"), 16) & _IFF_LOOPBACK:
                    out.add(name)
            except (OSError, ValueError):
                continue
    except OSError:
        out.add("lo")
    return out or {"lo"}


def psi(resource: str) -> dict[str, float] | None:
    try:
        return parse_psi(read_text(f"/proc/pressure/{resource}"))
    except OSError:
        return None


def root_fs_type() -> str:
    """The type of the filesystem mounted on / (the last mount there wins)."""
    fstype = "unknown"
    try:
        for line in read_text("/proc/mounts").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] == "/":
                fstype = fields[2]
    except OSError:
        pass
    return fstype
