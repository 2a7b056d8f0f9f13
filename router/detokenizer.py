"""Streaming token ids -> text deltas, holding back incomplete UTF-8, at a cost bounded per token."""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as decoding context, as vLLM does (INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5).
PROMPT_CONTEXT = 5


class Decoder(Protocol):
    """The part of `shardserve.workers.loader.tokenizer.Tokenizer` this module uses."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """vLLM's prefix_offset/read_offset algorithm (vllm/transformers_utils/detokenizer_utils.py).

    Each step decodes only the window `ids[prefix_offset:]`: text decoded from a few earlier tokens is
    the context that tells how the new tokens read (a leading space, bytes of one character split over
    tokens). The new text is what the window adds past `ids[prefix_offset:read_offset]`. While it ends in
    U+FFFD the last character is still incomplete, or while the new ids add no text (skipped special
    tokens), nothing is emitted and the offsets stay; only then does the window grow.

    `text` is what the output adds to the prompt's text. With byte-level BPE that is exactly
    `decode(output_ids)`. A SentencePiece decoder strips the first leading space of what it decodes, so
    there `decode(output_ids)` loses the space that starts the continuation of the prompt; `text` keeps
    it, as vLLM and llama.cpp's server do, so that prompt + completion reads right.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prompt_len = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._prompt_len :]

    def add(self, new_ids: list[int]) -> str:
        """Append generated ids; return the text they complete ("" while a character is incomplete)."""
        self._ids.extend(new_ids)
        return self._emit(hold_incomplete=True)

    def finish(self) -> str:
        """Emit what is still held back (an incomplete character decodes to U+FFFD, as decode() does)."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip_special
        )
        new_text = decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip_special)
        if hold_incomplete and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta
