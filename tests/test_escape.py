"""The client's ~. escape."""

from aaau.escape import EscapeFilter


def test_tilde_dot_at_start_detaches() -> None:
    assert EscapeFilter().feed(b"~.") == (b"", True)


def test_tilde_dot_after_newline_detaches_and_keeps_earlier_bytes() -> None:
    assert EscapeFilter().feed(b"ls\r~.junk") == (b"ls\r", True)


def test_tilde_dot_mid_line_is_just_input() -> None:
    assert EscapeFilter().feed(b"a~.") == (b"a~.", False)


def test_double_tilde_sends_one() -> None:
    assert EscapeFilter().feed(b"~~.") == (b"~.", False)


def test_escape_split_across_reads() -> None:
    f = EscapeFilter()
    assert f.feed(b"x\n~") == (b"x\n", False)
    assert f.feed(b".") == (b"", True)


def test_tilde_then_other_byte_passes_both() -> None:
    assert EscapeFilter().feed(b"~a") == (b"~a", False)


def test_ctrl_a_passes() -> None:
    assert EscapeFilter().feed(b"\x01") == (b"\x01", False)
