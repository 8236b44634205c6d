"""thoxd/engine/text.py: token bytes -> safe text, stop strings that span tokens, UTF-8."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from thoxd.engine.text import TextAssembler


def run(stops: Sequence[str], pieces: Iterable[bytes]) -> tuple[list[str], TextAssembler]:
    """Feed every piece (stopping at a stop, as the scheduler does), then flush if not stopped."""
    assembler = TextAssembler(stops)
    out = []
    for piece in pieces:
        out.append(assembler.feed(piece))
        if assembler.stopped:
            return out, assembler
    out.append(assembler.flush())
    return out, assembler


def test_plain_passthrough_without_stops() -> None:
    out, a = run([], [b"Hello", b", ", b"world"])
    assert out == ["Hello", ", ", "world", ""]
    assert not a.stopped


def test_plain_passthrough_with_unrelated_stops() -> None:
    out, a = run(["STOP"], [b"Hello", b" world"])
    assert out == ["Hello", " world", ""]
    assert not a.stopped


def test_empty_stop_strings_are_ignored() -> None:
    out, a = run(["", ""], [b"abc"])
    assert "".join(out) == "abc"
    assert not a.stopped


def test_stop_in_one_piece() -> None:
    out, a = run(["<end_of_turn>"], [b"Hi", b" there<end_of_turn>trailing"])
    assert "".join(out) == "Hi there"
    assert a.stopped


def test_stop_split_over_several_pieces_never_leaks() -> None:
    pieces = [b"Answer: 42", b"<end", b"_of", b"_tu", b"rn>", b"more"]
    a = TextAssembler(["<end_of_turn>"])
    emitted = []
    for piece in pieces:
        emitted.append(a.feed(piece))
        if a.stopped:
            break
    assert a.stopped
    assert "".join(emitted) == "Answer: 42"
    for chunk in emitted:
        assert "<" not in chunk
    # Nothing after the stop was consumed.
    assert len(emitted) == 5


def test_text_before_the_stop_in_the_same_piece_is_emitted() -> None:
    a = TextAssembler(["###"])
    assert a.feed(b"abc") == "abc"
    assert a.feed(b"def##") == "def"
    assert a.feed(b"#ghi") == ""
    assert a.stopped


def test_held_partial_released_on_next_piece() -> None:
    a = TextAssembler(["<end_of_turn>"])
    assert a.feed(b"x <end") == "x "
    assert a.feed(b" of story") == "<end of story"
    assert not a.stopped


def test_held_partial_released_on_flush() -> None:
    a = TextAssembler(["<end_of_turn>"])
    assert a.feed(b"a <end_of") == "a "
    assert a.flush() == "<end_of"
    assert not a.stopped
    assert a.flush() == ""


def test_partial_then_restart_of_the_stop() -> None:
    # "<<end>" : the first "<" is not the stop, the second starts it.
    a = TextAssembler(["<end>"])
    assert a.feed(b"<") == ""
    assert a.feed(b"<en") == "<"
    assert a.feed(b"d>") == ""
    assert a.stopped


def test_multibyte_character_split_in_two() -> None:
    a = TextAssembler([])
    assert a.feed(b"caf\xc3") == "caf"
    assert a.feed(b"\xa9!") == "é!"
    assert a.flush() == ""


def test_emoji_split_in_four() -> None:
    emoji = "🦙".encode()
    assert len(emoji) == 4
    a = TextAssembler(["STOP"])
    out = [a.feed(bytes([b])) for b in emoji]
    assert out == ["", "", "", "🦙"]
    assert a.flush() == ""


def test_multibyte_stop_string_split_mid_character() -> None:
    stop = "→END"
    data = ("go" + stop + "x").encode()
    out, a = run([stop], [data[i : i + 1] for i in range(len(data))])
    assert a.stopped
    assert "".join(out) == "go"


def test_truncated_character_at_the_end_is_replaced_on_flush() -> None:
    a = TextAssembler([])
    assert a.feed(b"ok\xe2\x82") == "ok"
    assert a.flush() == "\ufffd"


def test_earliest_of_several_stops_wins() -> None:
    out, a = run(["world", "lo"], [b"hello world"])
    assert a.stopped
    assert "".join(out) == "hel"


def test_earliest_stop_wins_across_pieces() -> None:
    # "abcd" starts first but is not complete; "bc" completes first and is earlier than "cx".
    a = TextAssembler(["abcd", "cx", "bc"])
    assert a.feed(b"zab") == "z"
    assert a.feed(b"cx") == "a"
    assert a.stopped


def test_longer_stop_held_while_shorter_one_cannot_match() -> None:
    a = TextAssembler(["\n\n", "User:"])
    assert a.feed(b"line\n") == "line"
    assert a.feed(b"Us") == "\n"
    assert a.feed(b"er") == ""
    assert a.feed(b": hi") == ""
    assert a.stopped
