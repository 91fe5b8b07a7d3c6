"""Control messages: strict decoding, precise errors, lossless round trips."""

import json

import pytest

from aaau import codec
from aaau import messages as m
from aaau.errors import ErrorCode
from aaau.protocol import HEADER_SIZE, Frame, Kind, ProtocolError

CLIENT = [
    m.Create(
        1,
        rows=24,
        cols=80,
        term="xterm-256color",
        argv=("claude", "--x"),
        share=True,
        cwd="/srv",
        env={"API_KEY": "k"},
    ),
    m.Create(1, rows=1, cols=9999, term="xterm"),
    m.Join(1, "abc_DEF-123", m.Role.READONLY),
    m.Join(1, "abc"),
    m.ListSessions(1),
    m.QueryStatus(1, "abc"),
    m.Kill(1, "abc"),
    m.Resize(40, 132),
    m.Ping(7),
    m.GetStatus(),
    m.ForceKill(),
    m.Detach(),
    m.InputEof(),
]
SERVER = [
    m.Welcome(1, "abc", m.Role.ADMIN, True, 24, 80, 3),
    m.Error("forbidden", "no"),
    m.Joined(m.ClientInfo(1, "alice", 1001, m.Role.INTERACTIVE)),
    m.Left(m.ClientInfo(1, "alice", 1001, m.Role.INTERACTIVE)),
    m.RoleChanged(m.Role.READONLY, "why"),
    m.Exited(code=3, signal=None),
    m.Exited(code=None, signal=9),
    m.Pong(7),
    m.Status(
        m.SessionInfo(
            "s",
            "u",
            1,
            ("a", "b"),
            2,
            "/dev/pts/3",
            1.5,
            24,
            80,
            False,
            (m.ClientInfo(1, "u", 1, m.Role.ADMIN),),
        ),
        True,
    ),
    m.Sessions(()),
    m.Done("ok"),
]


@pytest.mark.parametrize("message", CLIENT, ids=lambda x: type(x).__name__)
def test_client_messages_round_trip(message: m.ClientMessage) -> None:
    assert codec.decode_client(codec.encode(message)[HEADER_SIZE:]) == message


@pytest.mark.parametrize("message", SERVER, ids=lambda x: type(x).__name__)
def test_server_messages_round_trip(message: m.ServerMessage) -> None:
    assert codec.decode_server(codec.encode(message)[HEADER_SIZE:]) == message


def test_type_tag_is_snake_case() -> None:
    assert b'"type":"query_status"' in codec.encode(m.QueryStatus(1, "x"))
    assert b'"type":"input_eof"' in codec.encode(m.InputEof())


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"type":"resize","rows":"80","cols":1}', "expected int @ $.rows"),
        (b'{"type":"resize","rows":true,"cols":1}', "expected int @ $.rows"),
        (b'{"type":"resize","rows":80,"cols":1,"x":1}', "extra fields found (x)"),
        (b'{"type":"resize","rows":0,"cols":1}', "'rows' must be >= 1"),
        (b'{"type":"resize","rows":10000,"cols":1}', "'rows' must be <= 9999"),
        (b"[1,2]", "must hold a JSON object"),
        (b"{nope", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b'{"type":"launch_missiles"}', "unknown control message type 'launch_missiles'"),
        (b'{"rows":1}', "no string 'type'"),
        (b'{"type":"welcome","version":1}', "unknown control message type 'welcome'"),
        (b'{"type":"join","version":1,"session_id":"a/b"}', "session_id"),
        (b'{"type":"join","version":1,"session_id":"ab","role":"root"}', "role"),
        (
            b'{"type":"create","version":1,"rows":1,"cols":1,"term":"x","argv":[]}',
            "argv must not be empty",
        ),
        (
            b'{"type":"create","version":1,"rows":1,"cols":1,"term":"x","env":{"A B":"1"}}',
            "invalid environment variable name",
        ),
        (
            b'{"type":"create","version":1,"rows":1,"cols":1,"term":"x","cwd":"rel"}',
            "cwd must be an absolute path",
        ),
        (b'{"type":"create","version":1,"rows":1,"cols":1,"term":"x;rm"}', "term"),
    ],
)
def test_invalid_client_messages_get_precise_errors(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode_client(payload)
    assert message in str(info.value)
    assert info.value.code == "bad-message"


def test_argv_with_nul_is_refused() -> None:
    with pytest.raises(ProtocolError, match="NUL"):
        codec.decode_client(
            b'{"type":"create","version":1,"rows":1,"cols":1,"term":"x","argv":["a\\u0000b"]}'
        )


# --- the hello rules and enums --------------------------------------------------------


def _control(obj: object) -> Frame:
    return Frame(Kind.CONTROL, json.dumps(obj).encode())


def test_decode_hello_accepts_each_hello() -> None:
    v = m.PROTOCOL_VERSION
    for hello in (m.ListSessions(v), m.Join(v, "abc"), m.AsysCall(v, 1, "SYS_CAPS")):
        frame = Frame(Kind.CONTROL, codec.encode(hello)[HEADER_SIZE:])
        assert codec.decode_hello(frame) == hello


@pytest.mark.parametrize(
    ("frame", "code", "text"),
    [
        (Frame(Kind.DATA, b"typed"), "bad-frame", "first frame must be a control message"),
        (_control({"type": "ping", "nonce": 1}), "bad-message", "expected one of create, join"),
        (_control({"type": "detach"}), "bad-message", "got detach"),
        (_control({"type": "list_sessions", "version": 99}), "version", "version 99 is not"),
        (_control({"type": "welcome"}), "bad-message", "unknown control message type"),
    ],
)
def test_decode_hello_refuses_what_breaks_a_rule(frame: Frame, code: str, text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode_hello(frame)
    assert info.value.code == code and text in str(info.value)


@pytest.mark.parametrize("role", ["root", "ADMIN", 2, ["admin"]])
def test_enums_accept_only_their_exact_values(role: object) -> None:
    payload = json.dumps({"type": "join", "version": 1, "session_id": "abc", "role": role})
    with pytest.raises(ProtocolError, match=r"invalid join message: .*\$\.role"):
        codec.decode_client(payload.encode())
    good = payload.replace(json.dumps(role), '"readonly"')
    assert codec.decode_client(good.encode()) == m.Join(1, "abc", m.Role.READONLY)


def test_error_codes_and_status_words_decode_to_enums() -> None:
    error = codec.decode_server(b'{"type":"error","code":"too-slow","message":"m"}')
    assert isinstance(error, m.Error) and error.code is ErrorCode.TOO_SLOW
    with pytest.raises(ProtocolError, match=r"\$\.code"):
        codec.decode_server(b'{"type":"error","code":"made-up","message":"m"}')
    result = codec.decode_server(
        b'{"type":"asys_result","request_id":1,"instruction":"X","sw":"6982","status":"s"}'
    )
    assert isinstance(result, m.AsysResult) and result.sw is m.StatusWord.DENIED
    assert result.sw.label == "access_denied"


def test_fields_added_within_version_2_are_left_out_at_their_default() -> None:
    """An older build of version 2 accepts a newer client's hello that uses nothing new."""
    plain = json.loads(codec.encode(m.Create(2, rows=24, cols=80, term="xterm", argv=None))[5:])
    assert "pipe" not in plain and "keep" not in plain
    piped = json.loads(codec.encode(m.Create(2, rows=24, cols=80, term="x", argv=None, pipe=True))[5:])
    assert piped["pipe"] is True
    assert "reason" not in json.loads(codec.encode(m.Exited(code=0, signal=None))[5:])
    sid = "abcdefghijklmnopqrstuv"
    assert codec.decode_client(codec.encode(m.Join(2, sid))[5:]) == m.Join(2, sid)
