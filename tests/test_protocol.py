"""Framing: sans-I/O, synchronous."""

import pytest

from aaau.protocol import FrameDecoder, Kind, ProtocolError, data_frame, encode_frame


def test_frame_round_trips_byte_by_byte() -> None:
    wire = data_frame(b"ls\r") + encode_frame(Kind.CONTROL, b'{"type":"ping","nonce":1}')
    dec = FrameDecoder(1024)
    frames = []
    for i in range(len(wire)):
        dec.receive_data(wire[i : i + 1])
        frames += dec.frames()
    assert [(f.kind, f.payload) for f in frames] == [
        (Kind.DATA, b"ls\r"),
        (Kind.CONTROL, b'{"type":"ping","nonce":1}'),
    ]
    assert dec.buffered == 0


def test_ctrl_a_is_just_input() -> None:
    dec = FrameDecoder(1024)
    dec.receive_data(data_frame(b"\x01PING"))
    (frame,) = dec.frames()
    assert frame.kind is Kind.DATA
    assert frame.payload == b"\x01PING"


def test_header_layout_is_kind_then_big_endian_length() -> None:
    assert data_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert encode_frame(Kind.CONTROL, b"{}") == b"\x01\x00\x00\x00\x02{}"


def test_oversized_frame_is_refused_before_its_payload_arrives() -> None:
    dec = FrameDecoder(10)
    dec.receive_data(b"\x00\xff\xff\xff\xff")
    with pytest.raises(ProtocolError, match="exceeds the limit of 10") as info:
        dec.next_frame()
    assert info.value.code == "too-large"
    assert dec.buffered == 0


def test_unknown_kind_is_refused() -> None:
    dec = FrameDecoder(10)
    dec.receive_data(b"\x07\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="unknown frame kind 7"):
        dec.next_frame()


def test_decoder_stays_broken_after_an_error() -> None:
    dec = FrameDecoder(10)
    dec.receive_data(b"\x07\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        dec.next_frame()
    dec.receive_data(data_frame(b"ok"))
    with pytest.raises(ProtocolError):
        dec.next_frame()


def test_eof_inside_a_frame_is_an_error() -> None:
    dec = FrameDecoder(100)
    dec.receive_data(data_frame(b"hello")[:-2])
    assert dec.next_frame() is None
    dec.receive_data(b"")
    with pytest.raises(ProtocolError, match="inside a frame"):
        dec.next_frame()


def test_clean_eof_between_frames_is_not_an_error() -> None:
    dec = FrameDecoder(100)
    dec.receive_data(data_frame(b"x"))
    dec.receive_data(b"")
    assert dec.next_frame() is not None
    assert dec.next_frame() is None


def test_empty_data_frame_is_valid() -> None:
    dec = FrameDecoder(100)
    dec.receive_data(data_frame(b""))
    (frame,) = dec.frames()
    assert frame.payload == b""
