"""NET_ISOLATE: cut (and restore) network access for this session's agent, loopback aside.

nftables rules in table ``inet aaau``, chain ``isolate`` (output hook), match
the session's cgroup v2 (``socket cgroupv2``), so only this session's
processes are cut, not other sessions of the same agent user. Packets to
127.0.0.0/8 and ::1 pass; everything else is rejected at once (the agent gets
an error, not a hang). Where the machine cannot do this (no nft, no cgroup v2
under /sys/fs/cgroup) the answer is 6D00 with the reason, never a pretence.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs
import trio

from ..cgroups import Hierarchies
from .base import SW, AsysError, Context, Instruction, SessionScope

_TABLE, _CHAIN = "aaau", "isolate"
_CHAIN_SPEC = "{ type filter hook output priority 0; policy accept; }"
_ISOLATED = "isolated"
_NFT_CGROUP_ROOT = Path("/sys/fs/cgroup")  # nft resolves cgroupv2 paths below this


#: nft answers in milliseconds; one that hangs is a broken machine, not a slow one
_NFT_TIMEOUT = 10.0

@attrs.frozen
class IsolateArgs:
    action: str = "isolate"  # or "restore"


def _nft() -> str:
    nft = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if nft is None:
        raise AsysError(SW.NOT_SUPPORTED, "nftables (nft) is not installed on this machine")
    return nft


async def _run_nft(args: list[str], script: str | None = None) -> bytes:
    with trio.fail_after(_NFT_TIMEOUT):
        result = await trio.run_process(
            [_nft(), *args],
            stdin=script.encode() if script else subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"LANG": "C"},
        )
    if result.returncode != 0:
        raise AsysError(
            SW.SYSTEM_ERROR, "nft failed: " + result.stderr.decode(errors="replace").strip()[:300]
        )
    return bytes(result.stdout)


def _rule_match(cgroup: Path) -> str:
    mount = Hierarchies.discover().v2_mount
    try:
        relative = cgroup.relative_to(_NFT_CGROUP_ROOT)
        level = len(cgroup.relative_to(mount).parts) if mount else 0
    except ValueError:
        raise AsysError(
            SW.NOT_SUPPORTED,
            f"the session cgroup {cgroup} is not below "
            f"{_NFT_CGROUP_ROOT}, where nft looks for cgroups",
        ) from None
    return f'socket cgroupv2 level {level} "{relative}"'


def _comment(scope: SessionScope) -> str:
    return f"aaau:{scope.session_id}"


async def _isolate(scope: SessionScope) -> None:
    assert scope.cgroup is not None
    match, comment = _rule_match(scope.cgroup), _comment(scope)
    reject = "reject with icmpx type admin-prohibited"
    await _run_nft(
        ["-f", "-"],
        "\n".join(
            [
                f"add table inet {_TABLE}",
                f"add chain inet {_TABLE} {_CHAIN} {_CHAIN_SPEC}",
                f"add rule inet {_TABLE} {_CHAIN} {match} meta nfproto ipv4 "
                "ip daddr != 127.0.0.0/8 "
                f'{reject} comment "{comment}"',
                f"add rule inet {_TABLE} {_CHAIN} {match} meta nfproto ipv6 ip6 daddr != ::1 "
                f'{reject} comment "{comment}"',
            ]
        )
        + "\n",
    )


async def rule_handles(scope: SessionScope) -> list[int]:
    """Handles of this session's rules in the isolate chain."""
    try:
        out = await _run_nft(["-j", "-a", "list", "chain", "inet", _TABLE, _CHAIN])
    except AsysError:
        return []  # no table or chain: nothing of ours
    handles = []
    for item in json.loads(out).get("nftables", []):
        rule = item.get("rule")
        if rule and rule.get("comment") == _comment(scope):
            handles.append(int(rule["handle"]))
    return handles


async def restore(scope: SessionScope) -> None:
    for handle in await rule_handles(scope):
        await _run_nft(["delete", "rule", "inet", _TABLE, _CHAIN, "handle", str(handle)])
    scope.extras[_ISOLATED] = False


async def net_isolate(ctx: Context, args: IsolateArgs) -> dict[str, Any]:
    scope = ctx.session
    assert scope is not None
    if args.action not in ("isolate", "restore"):
        raise AsysError(
            SW.WRONG_DATA, f"action must be 'isolate' or 'restore', got {args.action!r}"
        )
    if args.action == "restore" and ctx.is_agent:
        raise AsysError(
            SW.DENIED,
            "the agent may ask for isolation but never lift it: a person in the session "
            "with NET_ISOLATE can",
        )
    _nft()
    if scope.cgroup is None:
        raise AsysError(
            SW.NOT_SUPPORTED,
            "this session has no cgroup v2, so its processes "
            "cannot be told apart from other sessions of the agent user",
        )
    if args.action == "isolate":
        if not scope.extras.get(_ISOLATED):
            await _isolate(scope)
            scope.extras[_ISOLATED] = True
    else:
        await restore(scope)
    return {
        "isolated": bool(scope.extras.get(_ISOLATED)),
        "loopback": "allowed",
        "method": "nftables socket cgroupv2",
        "cgroup": str(scope.cgroup),
    }


async def close(scope: SessionScope) -> None:
    """At session end: remove this session's rules (its cgroup is about to go)."""
    if scope.extras.get(_ISOLATED):
        with contextlib.suppress(AsysError):
            await restore(scope)


INSTRUCTIONS = (
    Instruction(
        "NET_ISOLATE",
        net_isolate,
        IsolateArgs,
        read_only=False,
        needs_session=True,
        summary="cut or restore network access of this session's agent (loopback kept)",
    ),
)
