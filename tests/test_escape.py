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


def test_terminal_answers_at_the_start_do_not_end_the_line_start() -> None:
    """A TUI started, the terminal answered its queries: ~. still detaches."""
    answers = b"\x1b[?62;22c\x1b[>1;10;0c\x1b[12;1R\x1bP>|xterm(390)\x1b\\\x1b]11;rgb:0/0/0\x07"
    f = EscapeFilter()
    assert f.feed(answers) == (answers, False)  # passed on, to the agent that asked
    assert f.feed(b"~.") == (b"", True)


def test_answers_split_across_reads_are_followed() -> None:
    f = EscapeFilter()
    assert f.feed(b"ok\r\x1b]10;rgb:ff") == (b"ok\r\x1b]10;rgb:ff", False)
    assert f.feed(b"/ff/ff\x1b") == (b"/ff/ff\x1b", False)
    assert f.feed(b"\\\x1b[") == (b"\\\x1b[", False)
    assert f.feed(b"I~.") == (b"I", True)  # a focus report, then the escape


def test_arrow_keys_and_function_keys_are_not_typing() -> None:
    assert EscapeFilter().feed(b"\x1b[A\x1bOP\x1b[15~~.") == (b"\x1b[A\x1bOP\x1b[15~", True)


def test_text_after_a_sequence_is_typing() -> None:
    assert EscapeFilter().feed(b"\x1b[Ax~.") == (b"\x1b[Ax~.", False)


def test_a_tilde_in_a_sequence_is_not_an_escape() -> None:
    """ESC ~ (Alt+~) and a CSI ending in ~ leave no tilde waiting."""
    assert EscapeFilter().feed(b"\x1b~.") == (b"\x1b~.", False)
    f = EscapeFilter()
    assert f.feed(b"x\r\x1b[3~") == (b"x\r\x1b[3~", False)
    assert f.feed(b"~.") == (b"", True)


def test_a_tilde_then_a_sequence_sends_the_tilde() -> None:
    assert EscapeFilter().feed(b"~\x1b[A") == (b"~\x1b[A", False)
