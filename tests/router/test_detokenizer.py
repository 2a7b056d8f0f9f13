"""Incremental detokenization: its deltas add up to decode() of all output ids, at a bounded cost per step."""

from __future__ import annotations

import random

import pytest

from shardserve.router.detokenizer import IncrementalDetokenizer
from shardserve.workers.loader.tokenizer import Tokenizer

# Multibyte pieces that byte-level BPE cuts into tokens that are not whole characters on their own.
ALPHABET = [
    *"abc xyz\n\t.,!?0123",
    *"日本語中文한국어éüñ",
    "🤗",
    "👍🏽",
    "🇫🇷",
    "👨‍👩‍👧",
    "𝔘",
    "\u0301",
    "<|im_end|>",
]


class CountingTokenizer:
    """Records the length of every id list decoded, to show the work per step stays bounded."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok(smollm2_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def prompt(tok: Tokenizer) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi 🤗"}]))


def stream(det: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed `ids` in random-sized steps, as a scheduler hands out 1..k tokens per step; then finish."""
    deltas, i = [], 0
    while i < len(ids):
        step = rng.randint(1, 3)
        deltas.append(det.add(ids[i : i + step]))
        i += step
    deltas.append(det.finish())
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_random_text_matches_decode(
    tok: Tokenizer, prompt: list[int], seed: int, skip_special_tokens: bool
) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(tok, prompt if rng.random() < 0.5 else [], skip_special_tokens)
        deltas = stream(det, ids, rng)
        assert det.text == "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert det.output_ids == ids


def test_random_ids_match_decode(tok: Tokenizer, prompt: list[int]) -> None:
    """Arbitrary ids, often bytes that never form valid UTF-8, still add up to what decode() gives."""
    rng = random.Random(7)
    # In a byte-level vocabulary a one-character token is one byte (SmolLM2 lacks those UTF-8 never uses).
    tokens = tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
    byte_ids = [i for i, t in enumerate(tokens) if len(t) == 1]
    assert len(byte_ids) > 200
    for _ in range(200):
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(30)
        ]
        det = IncrementalDetokenizer(tok, prompt)
        stream(det, ids, rng)
        assert det.text == tok.decode(ids)


def test_incomplete_character_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("🤗", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should take several byte-level tokens"
    det = IncrementalDetokenizer(tok, tok.encode("Hi "))
    assert [det.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.add(ids[-1:]) == "🤗"
    assert det.finish() == ""


def test_truncated_character_flushes_replacement_char(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🤗", add_special_tokens=False)[:-1]
    det = IncrementalDetokenizer(tok, [])
    emitted = "".join(det.add([i]) for i in ids)
    assert emitted.startswith("ok") and "\ufffd" not in emitted
    assert emitted + det.finish() == det.text == tok.decode(ids)
    assert det.text.endswith("\ufffd")


def test_special_tokens_skipped_or_kept(tok: Tokenizer, prompt: list[int]) -> None:
    ids = tok.encode("Hello<|im_end|>", add_special_tokens=False)
    skip = IncrementalDetokenizer(tok, prompt)
    keep = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False)
    for i in ids:
        skip.add([i])
        keep.add([i])
    assert (skip.text, keep.text) == ("Hello", "Hello<|im_end|>")


def test_cost_per_token_is_bounded(tok: Tokenizer, prompt: list[int]) -> None:
    text = "The quick brown fox 🦊 jumps over the lazy dog; 日本語も少し。 " * 200
    ids = tok.encode(text, add_special_tokens=False)
    counting = CountingTokenizer(tok)
    det = IncrementalDetokenizer(counting, prompt)  # type: ignore[arg-type]
    for i in ids:
        det.add([i])
    det.finish()
    assert det.text == text
    # Each step decodes a window of a few tokens, however long the output has grown.
    assert len(ids) > 2000 and max(counting.lengths) <= 16
