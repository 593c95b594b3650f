"""Incremental detokenization and stop handling, with a real byte-level BPE tokenizer built
offline."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import (
    IncrementalDetokenizer,
    check_stop_token,
    find_stop,
    stop_holdback,
)
from engine.request import Request
from engine.sampling_params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Café à la crème, naïve façade; straße über Größe.",
    "日本語のテキストです。中文文本，你好世界。",
    "emoji 😀🎉 and a family 👩‍👩‍👧 and flags 🇫🇷 done",
    "def main():\n    return 42  # the answer\n",
]
# Pieces for random texts: many are characters the small vocabulary must split into several tokens.
PIECES = [
    "hello",
    " world",
    " the",
    " fox",
    "é",
    "ß",
    "ü",
    "日本",
    "語",
    "中文",
    "你好",
    "😀",
    "🎉",
    "👩‍👩‍👧",
    "🇫🇷",
    "€",
    "ǅ",
    "Ω",
    " ",
    "\n",
    ",",
    ".",
    "stop",
    "STOP",
    "x",
    "42",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=SPECIALS[0], extra_special_tokens=SPECIALS[1:]
    )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> Iterator[str]:
    """Feeds ids in random chunks of 1..3 tokens (a step may take several); yields the pieces."""
    i = 0
    while i < len(ids):
        n = rng.randint(1, 3)
        yield detok.step(ids[i : i + n])
        i += n


def test_tokenizer_really_splits_characters_across_tokens(tokenizer):
    ids = encode(tokenizer, "😀")
    assert len(ids) > 1 and all(tokenizer.decode([i]) == "\ufffd" for i in ids)


def test_a_split_character_appears_only_when_complete(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Hi "), skip_special_tokens=True)
    ids = encode(tokenizer, "😀")
    assert [detok.step([t]) for t in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detok.step(encode(tokenizer, "!")) == "!"
    assert detok.text == "😀!"


@pytest.mark.parametrize("seed", range(40))
def test_incremental_text_equals_full_decode_and_never_shows_half_a_character(tokenizer, seed):
    rng = random.Random(seed)
    prompt = encode(tokenizer, random_text(rng))
    output = encode(tokenizer, random_text(rng))
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    emitted = ""
    for piece in stream(detok, output, rng):
        assert "\ufffd" not in piece
        emitted += piece
        assert detok.text == emitted
    full = tokenizer.decode(output, clean_up_tokenization_spaces=False)
    assert emitted + detok.flush() == full == detok.text


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept_like_a_full_decode(tokenizer, skip):
    rng = random.Random(7)
    eos = tokenizer.convert_tokens_to_ids(SPECIALS[0])
    end = tokenizer.convert_tokens_to_ids(SPECIALS[2])
    output = []
    for _ in range(6):
        output += encode(tokenizer, random_text(rng)) + [rng.choice([eos, end])]
    output += [eos] * 20  # as under ignore_eos
    detok = IncrementalDetokenizer(tokenizer, [eos], skip_special_tokens=skip)
    streamed = "".join(stream(detok, output, rng)) + detok.flush()
    assert streamed == tokenizer.decode(
        output, skip_special_tokens=skip, clean_up_tokenization_spaces=False
    )


def test_flush_emits_a_trailing_incomplete_character_as_the_full_decode_does(tokenizer):
    ids = encode(tokenizer, "ok 😀")[:-1]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    assert detok.step(ids) == "ok "
    assert detok.flush() == tokenizer.decode(ids)[len("ok ") :]
    assert detok.text == tokenizer.decode(ids)


def test_a_long_run_ending_mid_character_emits_its_whole_characters_at_once(tokenizer):
    ids = encode(tokenizer, "中文你好語日本" * 3 + "😀")
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    assert detok.step(ids[:-1]) == "中文你好語日本" * 3
    assert detok.step(ids[-1:]) == "😀"
    assert detok.text == tokenizer.decode(ids)


def test_steps_that_all_end_mid_character_still_stream_and_stay_cheap(tokenizer):
    rare = "鬱龘靐齉爨" * 8  # outside the training corpus: every character is 3 byte tokens
    ids = encode(tokenizer, rare)
    assert len(ids) == 3 * len(rare)
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, [], skip_special_tokens=True)
    # 1 token, then 3 at a time: every step but the last ends one byte into a character.
    pieces = [detok.step(ids[:1])] + [detok.step(ids[i : i + 3]) for i in range(1, len(ids), 3)]
    assert pieces[0] == "" and all(
        len(p) == 1 for p in pieces[1:]
    )  # each completed character, once
    assert "".join(pieces) == rare and detok.flush() == ""
    assert counting.decoded < 8 * len(ids)


def test_invalid_bytes_are_emitted_as_replacement_characters_once_clearly_not_a_character(
    tokenizer,
):
    continuation = encode(tokenizer, "😀")[-1]  # a lone UTF-8 continuation byte
    ids = encode(tokenizer, "ab") + [continuation] * 12
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    for t in ids:
        detok.step([t])
    assert detok.text.startswith("ab\ufffd")
    assert detok.text + detok.flush() == tokenizer.decode(ids)
    assert detok.step(encode(tokenizer, "x")) == "x"


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids it is asked to decode."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0
        self.all_special_ids = inner.all_special_ids

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.inner.decode(ids, **kwargs)


def test_each_step_decodes_a_small_window_not_the_whole_output(tokenizer):
    counting = CountingTokenizer(tokenizer)
    rng = random.Random(3)
    output = encode(tokenizer, "".join(random_text(rng) for _ in range(40)))
    assert len(output) > 300
    detok = IncrementalDetokenizer(counting, encode(tokenizer, "hello"), skip_special_tokens=True)
    for t in output:
        detok.step([t])
    assert detok.text == tokenizer.decode(output)
    assert counting.decoded < 8 * len(output)  # linear, where re-decoding everything is quadratic


# -- stop strings ----------------------------------------------------------------------------------


def test_find_stop_returns_the_index_to_cut_at_without_the_stop():
    text = "hello world. Bye"
    assert find_stop(text, len(text), ["."]) == (11, ".")
    assert text[:11] == "hello world"
    assert find_stop("no stop here", 12, ["STOP"]) is None


def test_find_stop_at_the_very_start():
    assert find_stop("STOP and more", 13, ["STOP"]) == (0, "STOP")


def test_find_stop_picks_the_earliest_of_several_and_the_first_listed_on_a_tie():
    text = "one two three"
    assert find_stop(text, len(text), ["three", "two", "one two three"]) == (0, "one two three")
    assert find_stop(text, len(text), ["three", "two"]) == (4, "two")
    assert find_stop(text, len(text), ["two", "two t"]) == (4, "two")


def test_find_stop_only_searches_the_tail_a_new_match_can_be_in():
    # A match wholly inside old text was the job of an earlier step; one reaching into new text is
    # not.
    assert find_stop("abcSTOPxyz", 3, ["STOP"]) is None
    assert find_stop("abcSTOPxyz", 4, ["STOP"]) == (3, "STOP")
    assert find_stop("abcSTO", 1, ["STOP"]) is None
    assert find_stop("abcSTOP", 1, ["STOP"]) == (3, "STOP")


def test_stop_spanning_token_boundaries_is_cut_while_streaming(tokenizer):
    rng = random.Random(11)
    before, stop = "hello 日本語 the fox", "😀🎉 x"
    ids = encode(tokenizer, before + stop + " world after")
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    found = None
    for piece in stream(detok, ids, rng):
        found = find_stop(detok.text, len(piece), ["never", stop])
        if found:
            break
    assert found == (len(before), stop)
    assert detok.text[: found[0]] == before


def test_holdback_is_the_longest_suffix_that_could_start_a_stop():
    assert stop_holdback("hello wor", ["world"]) == 3
    assert (
        stop_holdback("hello w", ["world", "hello w"]) == 1
    )  # "hello w" itself is a match, not held
    assert stop_holdback("abcab", ["abcabd", "b"]) == 5
    assert stop_holdback("hello", ["xyz"]) == 0
    assert stop_holdback("", ["xyz"]) == 0
    assert stop_holdback("ab", []) == 0


@pytest.mark.parametrize("seed", range(10))
def test_streamed_text_with_holdback_never_shows_what_a_stop_later_removes(tokenizer, seed):
    rng = random.Random(seed)
    stops = ["😀🎉", "the fox", "\n\n"]
    ids = encode(tokenizer, "".join(rng.choice(PIECES + ["the fox", "😀🎉"]) for _ in range(30)))
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    shown, final = "", None
    for piece in stream(detok, ids, rng):
        text = detok.text
        found = find_stop(text, len(piece), stops)
        if found:
            final = text[: found[0]]
            break
        visible = text[: len(text) - stop_holdback(text, stops)]
        assert visible.startswith(shown)
        shown = visible
    if final is None:
        final = detok.text + detok.flush()
    assert final.startswith(shown)
    assert not any(s in final for s in stops)


# -- stop tokens -----------------------------------------------------------------------------------


def request_with(output: list[int], **params) -> Request:
    request = Request("r", [1, 2], SamplingParams(**params))
    request.output_token_ids = list(output)
    return request


def test_eos_stops_unless_ignore_eos():
    assert check_stop_token(request_with([5, 9]), 9, [9]) == "stop"
    assert check_stop_token(request_with([5, 9], ignore_eos=True), 9, [9]) is None
    assert check_stop_token(request_with([5, 8]), 8, [9]) is None


def test_stop_token_ids_stop_even_with_ignore_eos():
    assert (
        check_stop_token(request_with([5, 4], stop_token_ids=[4], ignore_eos=True), 4, [9])
        == "stop"
    )


def test_no_stop_token_ends_a_request_before_min_tokens():
    params = {"min_tokens": 2, "stop_token_ids": [4]}
    assert check_stop_token(request_with([9], **params), 9, [9]) is None
    assert check_stop_token(request_with([1, 4], **params), 4, [9]) is None
    assert check_stop_token(request_with([1, 2, 4], **params), 4, [9]) == "stop"
    assert check_stop_token(request_with([1, 2, 9], **params), 9, [9]) == "stop"
