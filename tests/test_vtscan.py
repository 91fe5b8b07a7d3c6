"""The output scanner: what is recognised, split anywhere, held and released."""

from __future__ import annotations

import pytest

from aaau.vtscan import Effect, Scanner, without

CASES = [
    (b"\x1b]52;c;aGVsbG8=\x07", Effect.CLIPBOARD_WRITE),
    (b"\x1b]52;c;aGVsbG8=\x1b\\", Effect.CLIPBOARD_WRITE),
    (b"\x1b]52;c;?\x07", Effect.CLIPBOARD_QUERY),
    (b"\x1b]52;;?\x1b\\", Effect.CLIPBOARD_QUERY),
    (b"\x1b[c", Effect.QUERY),
    (b"\x1b[0c", Effect.QUERY),
    (b"\x1b[>c", Effect.QUERY),
    (b"\x1b[=c", Effect.QUERY),
    (b"\x1b[6n", Effect.QUERY),
    (b"\x1b[?6n", Effect.QUERY),
    (b"\x1b[5n", Effect.QUERY),
    (b"\x1b[>q", Effect.QUERY),
    (b"\x1b[>0q", Effect.QUERY),
    (b"\x1b[?2004$p", Effect.QUERY),
    (b"\x1b[14t", Effect.QUERY),
    (b"\x1b[21t", Effect.QUERY),
    (b"\x1b[?u", Effect.QUERY),
    (b"\x1b[x", Effect.QUERY),
    (b"\x1bP$qm\x1b\\", Effect.QUERY),
    (b"\x1bP+q544e\x1b\\", Effect.QUERY),
    (b"\x1b]11;?\x07", Effect.QUERY),
    (b"\x1b]4;1;?\x1b\\", Effect.QUERY),
    (b"\x1b]0;my title\x07", Effect.TITLE),
    (b"\x1b]2;my title\x1b\\", Effect.TITLE),
    (b"\x1b]8;;https://example.com\x1b\\", Effect.HYPERLINK),
    (b"\x1b[?1049h", Effect.MODE),
    (b"\x1b[?1000;1006h", Effect.MODE),
    (b"\x1b[?25l", Effect.MODE),
    (b"\x1b=", Effect.MODE),
    (b"\x1b>", Effect.MODE),
    (b"\x1bc", Effect.MODE),
    (b"\x1b[3;20r", Effect.MODE),
    (b"\x1b[r", Effect.MODE),
    (b"\x1b(0", Effect.MODE),
    (b"\x1b(B", Effect.MODE),
    (b"\xc2\x9b6n", Effect.QUERY),  # a C1 CSI, as UTF-8
    (b"\xc2\x9d52;c;?\xc2\x9c", Effect.CLIPBOARD_QUERY),
]
HARMLESS = [b"\x1b[1;31m", b"\x1b[2J", b"\x1b[10;5H", b"\x1b[22;0t", b"\x1b]11;rgb:0/0/0\x07", b"\x1b7", b"\x1bPq#0;2;0;0;0\x1b\\"]


@pytest.mark.parametrize(("sequence", "effect"), CASES)
def test_each_sequence_is_recognised_in_text(sequence: bytes, effect: Effect) -> None:
    segments = Scanner().feed(b"before" + sequence + b"after")
    assert segments == [(b"before", None), (sequence, effect), (b"after", None)]
    assert without(segments, frozenset({effect})) == b"beforeafter"


@pytest.mark.parametrize("sequence", HARMLESS)
def test_other_sequences_pass_untouched(sequence: bytes) -> None:
    data = b"a" + sequence + b"b"
    segments = Scanner().feed(data)
    assert b"".join(s for s, _ in segments) == data
    assert all(effect is None for _, effect in segments)


@pytest.mark.parametrize(("sequence", "effect"), CASES)
def test_a_sequence_split_anywhere_is_still_recognised(sequence: bytes, effect: Effect) -> None:
    data = b"x" + sequence + b"y"
    for cut in range(1, len(data)):
        scanner = Scanner()
        segments = scanner.feed(data[:cut]) + scanner.feed(data[cut:])
        assert b"".join(s for s, _ in segments) == data, cut
        assert (sequence, effect) in segments, cut
        assert not scanner.holding


def test_plain_text_is_one_segment_and_costs_one_search() -> None:
    data = b"line\r\n" * 10000
    assert Scanner().feed(data) == [(data, None)]


def test_a_paused_csi_is_released_but_a_clipboard_string_is_not() -> None:
    scanner = Scanner()
    assert scanner.feed(b"prompt\x1b[1") == [(b"prompt", None)]
    assert scanner.holding
    assert scanner.flush() == [(b"\x1b[1", None)] and not scanner.holding
    assert scanner.feed(b"text\x1b]52;c;aGVs") == [(b"text", None)]
    assert scanner.flush() == []  # a clipboard write-to-be: never let out half-made
    assert scanner.feed(b"bG8=\x07") == [(b"\x1b]52;c;aGVsbG8=\x07", Effect.CLIPBOARD_WRITE)]


def test_what_is_not_a_csi_is_not_held() -> None:
    scanner = Scanner()
    data = b"\x1b[1\n\x1b[x" + b"z" * 10
    segments = scanner.feed(data)
    assert b"".join(s for s, _ in segments) == data and not scanner.holding


def test_an_endless_clipboard_string_is_dropped_not_held_forever() -> None:
    scanner = Scanner()
    data = b"\x1b]52;c;" + b"A" * (1 << 20)
    segments = scanner.feed(data)
    assert without(segments, frozenset({Effect.CLIPBOARD_WRITE})) == b""
    assert not scanner.holding
