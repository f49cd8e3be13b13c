"""The <think> splitter every dialect uses (utils/response_processing.py)."""

from __future__ import annotations

import pytest

from ollama_server.core.reasoning import (
    KEEP,
    SPLIT,
    STRIP,
    ThinkSplitter,
    reasoning_mode,
    split_think,
)
from ollama_server.core.schemas import Finish, ReasoningDelta, TextDelta


def run(chunks: list[str], mode: str = SPLIT, opens: bool = False) -> tuple[str, str]:
    splitter = ThinkSplitter(mode, starts_in_reasoning=opens)
    events = list(splitter.process([TextDelta(c) for c in chunks] + [Finish("stop")]))
    assert isinstance(events[-1], Finish)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    return reasoning, content


@pytest.mark.parametrize("chunks,mode,opens,expected", [
    (["<think>a b</think>\n\nanswer"], SPLIT, False, ("a b", "answer")),
    # tags split across chunk boundaries, in every place
    (["<", "thi", "nk>", "a", "</", "thin", "k>", "\n", "\nans", "wer"], SPLIT, False,
     ("a", "answer")),
    (["  <think>x</think>y"], SPLIT, False, ("x", "y")),
    # the prompt opened <think>: the output only has </think>
    (["reason", "ing</think>\n\nfinal"], SPLIT, True, ("reasoning", "final")),
    (["reasoning</think>final"], KEEP, True, ("", "<think>reasoning</think>final")),
    (["reasoning</think>final"], STRIP, True, ("", "final")),
    # no think block: everything is content, nothing held back
    (["hello ", "<think> is a tag"], SPLIT, False, ("", "hello <think> is a tag")),
    (["<thin", "g>"], SPLIT, False, ("", "<thing>")),
    (["<think>a</think>\n\nb"], KEEP, False, ("", "<think>a</think>\n\nb")),
    (["<think>a</think>\n\nb"], STRIP, False, ("", "b")),
    # unterminated reasoning stays reasoning (max tokens hit while thinking)
    (["<think>still thinking </th"], SPLIT, False, ("still thinking </th", "")),
    (["\n\n"], SPLIT, False, ("", "\n\n")),
])
def test_splitter_table(chunks, mode, opens, expected):
    assert run(chunks, mode, opens) == expected


def test_reasoning_streams_before_content_and_in_pieces():
    splitter = ThinkSplitter(SPLIT)
    first = splitter.feed("<think>one ")
    assert first == [ReasoningDelta("one ")]
    assert splitter.feed("two</think>") == [ReasoningDelta("two")]
    assert splitter.feed("\n\nDone") == [TextDelta("Done")]


def test_modes_and_helper():
    assert reasoning_mode(True, True) == SPLIT
    assert reasoning_mode(False, True) == STRIP
    assert reasoning_mode(None, True) == KEEP
    assert reasoning_mode(None, False) == SPLIT
    assert split_think("<think>r</think>c") == ("r", "c")
    assert split_think("r</think>c", starts_in_reasoning=True) == ("r", "c")


def test_tokens_stay_with_their_text():
    from ollama_server.core.schemas import TokenInfo

    splitter = ThinkSplitter(SPLIT)
    tok = TokenInfo(id=5, text="hi", logprob=-0.1)
    events = list(splitter.process([TextDelta("hi", tokens=[tok])]))
    assert events == [TextDelta("hi", tokens=[tok])]
