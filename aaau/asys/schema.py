"""JSON Schemas of the instructions' arguments, from their attrs classes (for MCP tools).

Pure: the argument classes say the names, types and defaults; :data:`_HINTS`
adds what a type cannot say (the values an ``action`` takes, a range) and one
line per argument for the model reading the tool list. The dispatcher still
checks every call itself (strict cattrs, then the handler's own checks).
"""

from __future__ import annotations

from typing import Any

import attrs

from .base import Instruction

_TYPES = {int: "integer", str: "string", "int": "integer", "str": "string"}

_HINTS: dict[tuple[str, str], dict[str, Any]] = {
    ("SYS_PROCS", "count"): {"minimum": 1, "maximum": 50, "description": "how many processes"},
    ("PROC_THROTTLE", "pid"): {"minimum": 2, "description": "a process of this session"},
    ("PROC_THROTTLE", "action"): {"enum": ["stop", "cont"], "description": "SIGSTOP or SIGCONT"},
    ("NET_ISOLATE", "action"): {
        "enum": ["isolate", "restore"],
        "description": "cut network access but loopback (the agent may not restore)",
    },
    ("SVC_RESTART", "service"): {
        "pattern": "^[a-z0-9_][a-z0-9_.@-]{0,63}$",
        "description": "an allowlisted systemd service, without .service",
    },
    ("TASK_QUERY", "handle"): {"description": "a handle SVC_RESTART answered"},
}


def input_schema(instr: Instruction) -> dict[str, Any]:
    """The JSON Schema of ``instr``'s arguments: an object, no extra keys."""
    properties: dict[str, Any] = {}
    required = []
    for field in attrs.fields(instr.args):
        prop: dict[str, Any] = {"type": _TYPES[field.type]}
        if field.default is attrs.NOTHING:
            required.append(field.name)
        else:
            prop["default"] = field.default
        prop.update(_HINTS.get((instr.name, field.name), {}))
        properties[field.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema
