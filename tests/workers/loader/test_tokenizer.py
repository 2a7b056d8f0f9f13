"""Tokenizer rebuilt from GGUF metadata vs llama.cpp's and transformers' tokenizers of the same file."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
import transformers
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from shardserve.workers.loader.source import CheckpointError
from shardserve.workers.loader.tokenizer import NO_CHAT_TEMPLATE, Tokenizer
from tests.fixtures.tiny_models import make_tiny

TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "12345 3.14159",
    "1234567890",
    "The year 2024 had 366 days.",
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nnp.zeros((3, 4), dtype=np.float32)",
    "   \t  mixed whitespace\t\t",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "    ",
    "tabs\tand\tmore\ttabs",
    "don't won't I'll you're we've she'd it's",
    "DON'T SHOUT'LL",
    "日本語のテキストです。",
    "中文分词测试，你好世界！",
    "한국어 텍스트",
    "café naïve résumé Zürich façade",
    "Ελληνικά και русский текст",
    "emoji 🤗👍🏽🇫🇷 and 👨‍👩‍👧 family",
    "math: ∑ x² ≤ ∞ → ∀ε>0",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text <|im_end|> inline special",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_sta rt|> <im_end>",
    "URL https://example.com/path?q=1&r=two#frag",
    "email someone@example.org, phone +1-555-0100",
    'JSON {"key": [1, 2.5, null, true]}',
    "a" * 50 + " " + "b" * 3,
    "Mixed123Numbers456and789",
    "",
]

# SmolLM2 splits digits off before the byte-level regex (tokenizer.ggml.pre = "smollm"), so a whitespace
# run before a digit is one piece. transformers' GGUF loader has no split for "smollm" and runs the plain
# gpt2 regex, which cuts the run ("  4" -> "Ġ", "Ġ4" pieces): these are compared with llama.cpp only.
SPACES_BEFORE_DIGITS = ["x  4", "a \xa06C", "col1   col2\n  42"]


@pytest.fixture(scope="module")
def gguf_path(smollm2_path: str) -> str:
    return smollm2_path


@pytest.fixture(scope="module")
def gguf_fields(gguf_path: str) -> dict[str, Any]:
    return {key: f for key, f in GGUFReader(gguf_path).fields.items()}


@pytest.fixture(scope="module")
def tokenizer_meta(gguf_fields: dict[str, Any]) -> dict[str, Any]:
    return {key: f.contents() for key, f in gguf_fields.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(gguf_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def llama_ref(gguf_path: str) -> Any:
    return llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def hf_ref(gguf_path: str) -> Any:
    directory, name = os.path.split(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def write_vocab_gguf(path: Path, fields: dict[str, Any], overrides: dict[str, Any]) -> str:
    """A tensor-less GGUF with the model's metadata, `tokenizer.*` keys replaced by `overrides`.

    llama.cpp loads it with vocab_only=True, so its tokenizer can be asked about vocabularies and pre
    types that no model at hand ships.
    """
    writer = GGUFWriter(str(path), arch="llama")
    for key, f in fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in overrides:
            continue
        kind = f.types[0]
        writer.add_key_value(
            key, f.contents(), kind, sub_type=f.types[-1] if kind == GGUFValueType.ARRAY else None
        )
    for key, (value, kind, sub_type) in overrides.items():
        writer.add_key_value(key, value, kind, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def llama_ids(llama: Any, text: str, add_special: bool) -> list[int]:
    return llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)


@pytest.mark.parametrize("add_special", [True, False])
@pytest.mark.parametrize("text", TEXTS + SPACES_BEFORE_DIGITS)
def test_ids_match_llama_cpp(ours: Tokenizer, llama_ref: Any, text: str, add_special: bool) -> None:
    assert ours.encode(text, add_special_tokens=add_special) == llama_ids(llama_ref, text, add_special)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours: Tokenizer, hf_ref: Any, text: str) -> None:
    assert ours.encode(text) == hf_ref.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_tokens(ours: Tokenizer) -> None:
    im_start, im_end = ours.encode("<|im_start|><|im_end|>", add_special_tokens=False)
    assert ours.convert_ids_to_tokens([im_start, im_end]) == ["<|im_start|>", "<|im_end|>"]
    assert ours.is_special(im_start) and ours.is_special(im_end)
    assert not ours.is_special(ours.encode("Hello", add_special_tokens=False)[0])
    assert ours.decode([im_start, *ours.encode("hi", add_special_tokens=False), im_end]) == "hi"
    assert (ours.bos_token_id, ours.bos_token, ours.eos_token_id, ours.eos_token) == (
        1,
        "<|im_start|>",
        2,
        "<|im_end|>",
    )
    assert ours.vocab_size == 49152
    assert not ours.add_bos_token  # tokenizer.ggml.add_bos_token = false in this file


def test_stop_token_ids(ours: Tokenizer) -> None:
    im_end = ours.backend.token_to_id("<|im_end|>")
    assert {im_end, 2} <= ours.stop_token_ids
    assert ours.backend.token_to_id("<|endoftext|>") in ours.stop_token_ids
    assert ours.backend.token_to_id("<|im_start|>") not in ours.stop_token_ids


CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? 🇮🇹"},
]


def test_chat_template_matches_references(ours: Tokenizer, hf_ref: Any) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    rendered = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert rendered == hf_ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    formatter = Jinja2ChatFormatter(ours.chat_template, eos_token=ours.eos_token, bos_token=ours.bos_token)
    assert rendered == formatter(messages=CONVERSATION).prompt
    assert rendered.endswith("<|im_start|>assistant\n")
    without_prompt = ours.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert not without_prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_default_system_prompt(ours: Tokenizer) -> None:
    default = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    assert ours.apply_chat_template(CONVERSATION).startswith(default)
    custom = [{"role": "system", "content": "Be terse."}, *CONVERSATION]
    rendered = ours.apply_chat_template(custom)
    assert rendered.startswith("<|im_start|>system\nBe terse.<|im_end|>\n") and default not in rendered


def test_chat_template_content_parts(ours: Tokenizer) -> None:
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital "},
                {"type": "text", "text": "of France?"},
            ],
        }
    ]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template(CONVERSATION[:1])
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="image_url"):
        ours.apply_chat_template(image)


def test_no_chat_template_raises(ours: Tokenizer) -> None:
    bare = Tokenizer(backend=ours.backend, eos_token_id=2)
    with pytest.raises(ValueError, match=NO_CHAT_TEMPLATE):
        bare.apply_chat_template(CONVERSATION)


def test_encoding_is_fast_enough(ours: Tokenizer) -> None:
    # Guards against a pre-tokenizer regex that backtracks badly on long whitespace or digit runs.
    text = (" " * 2000) + ("9" * 2000) + ("word " * 2000)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize(
    "pre", ["llama-bpe", "qwen2", "gpt-2", "default", "starcoder", "deepseek-llm", "deepseek-coder"]
)
def test_pre_types_match_llama_cpp(
    tmp_path: Path, gguf_fields: dict[str, Any], tokenizer_meta: dict[str, Any], pre: str
) -> None:
    """The same vocabulary under another tokenizer.ggml.pre: llama.cpp and we must split alike."""
    path = write_vocab_gguf(
        tmp_path / f"{pre}.gguf", gguf_fields, {"tokenizer.ggml.pre": (pre, GGUFValueType.STRING, None)}
    )
    llama = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    ours = Tokenizer.from_gguf_metadata({**tokenizer_meta, "tokenizer.ggml.pre": pre})
    for text in TEXTS:
        assert ours.encode(text) == llama_ids(llama, text, True), text


def test_unknown_pre_type_falls_back_to_gpt2(tokenizer_meta: dict[str, Any], caplog: Any) -> None:
    with caplog.at_level(logging.WARNING):
        ours = Tokenizer.from_gguf_metadata({**tokenizer_meta, "tokenizer.ggml.pre": "no-such-pre"})
    assert "no-such-pre" in caplog.text
    gpt2 = Tokenizer.from_gguf_metadata({**tokenizer_meta, "tokenizer.ggml.pre": "gpt-2"})
    assert ours.encode(TEXTS[4]) == gpt2.encode(TEXTS[4])


def test_unsupported_model_type(tokenizer_meta: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf_metadata({**tokenizer_meta, "tokenizer.ggml.model": "bert"})


def sentencepiece_vocab(meta: dict[str, Any]) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary made from SmolLM2's: its pieces as text with spaces as `▁`,
    scored by id, behind `<unk>`, `<s>`, `</s>` and the 256 `<0xNN>` byte pieces.

    Like a real SentencePiece vocabulary, every character of a piece is a piece of its own.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces: dict[str, float] = {}
    for i, (piece, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])):
        try:
            text = (
                bytes(byte_of[c] for c in piece).decode("utf-8").replace(" ", "\u2581") if kind == 1 else ""
            )
        except UnicodeDecodeError:
            continue
        # llama.cpp reads token texts as C strings, so a piece holding NUL cannot be matched there.
        if text and "\x00" not in text:
            pieces.setdefault(text, -float(i))
    chars = {p for p in pieces if len(p) == 1}
    pieces = {p: score for p, score in pieces.items() if set(p) <= chars}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
    scores = [0.0] * 259 + list(pieces.values())
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens + ["<|im_start|>", "<|im_end|>"], scores + [0.0, 0.0], types + [3, 3]


def test_sentencepiece_matches_llama_cpp(
    tmp_path: Path, gguf_fields: dict[str, Any], tokenizer_meta: dict[str, Any]
) -> None:
    tokens, scores, types = sentencepiece_vocab(tokenizer_meta)
    arr = GGUFValueType.ARRAY
    overrides = {
        "tokenizer.ggml.model": ("llama", GGUFValueType.STRING, None),
        "tokenizer.ggml.tokens": (tokens, arr, GGUFValueType.STRING),
        "tokenizer.ggml.scores": (scores, arr, GGUFValueType.FLOAT32),
        "tokenizer.ggml.token_type": (types, arr, GGUFValueType.INT32),
        "tokenizer.ggml.bos_token_id": (1, GGUFValueType.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, GGUFValueType.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, GGUFValueType.UINT32, None),
    }
    # the other tokenizer.* keys describe SmolLM2's byte-level vocabulary (no add_space_prefix: llama's default)
    fields = {k: f for k, f in gguf_fields.items() if not k.startswith("tokenizer.ggml.")}
    path = write_vocab_gguf(tmp_path / "spm.gguf", fields, overrides)
    llama = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    ours = Tokenizer.from_gguf(path)
    assert ours.bos_token == "<s>" and ours.add_bos_token
    for text in TEXTS + ["\x01\x7f bytes", "  two leading spaces"]:
        ids = ours.encode(text)
        assert ids == llama_ids(llama, text, True), text
        if "<|" not in text:  # a special token in the text is dropped by decode
            assert ours.decode(ids) == text


def test_from_hf_dir(tmp_path: Path, hf_ref: Any, ours: Tokenizer, llama_ref: Any) -> None:
    hf_ref.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 17]}))
    loaded = Tokenizer.from_hf_dir(str(tmp_path))
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.eos_token) == (1, 2, "<|im_end|>")
    assert loaded.stop_token_ids == {0, 2, 17}
    assert loaded.vocab_size == ours.vocab_size and not loaded.add_bos_token
    assert loaded.apply_chat_template(CONVERSATION) == ours.apply_chat_template(CONVERSATION)
    for text in TEXTS:
        assert loaded.encode(text) == llama_ids(llama_ref, text, True), text


def test_from_hf_dir_reads_bos_from_post_processor(tmp_path: Path, ours: Tokenizer) -> None:
    """A tokenizer.json whose post-processor adds BOS (Llama 3 style) and a config without add_bos_token."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    backend = Backend.from_str(ours.backend.to_str())
    backend.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": None})
    )
    loaded = Tokenizer.from_hf_dir(str(tmp_path))
    assert loaded.add_bos_token and loaded.eos_token_id is None and loaded.chat_template is None
    assert loaded.encode("hi") == [1, *ours.encode("hi", add_special_tokens=False)]
    assert loaded.encode("hi", add_special_tokens=False) == ours.encode("hi", add_special_tokens=False)


# ---- chat templates are checkpoint content: refused at load when they reach past the sandbox -------------

ESCAPING_TEMPLATES = [
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "it reads the attribute '__class__' (line 1); reads the "
     "attribute '__mro__' (line 1); reads the attribute '__subclasses__' (line 1)"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "attribute '__init__'"),
    ("{% for m in messages %}{{ m['__class__'] }}{% endfor %}", "attribute '__class__'"),
    ("{{ raise_exception|attr('__globals__') }}", "attribute '__globals__'"),
    ("{{ lipsum.func_globals }}", "attribute 'func_globals'"),
    ("{{ self._TemplateReference__context }}", "attribute '_TemplateReference__context'"),
    ("{{ __builtins__ }}", "variable '__builtins__'"),
    ("{{ messages|shell }}", "filter 'shell'"),
    ("{% if messages is executable %}x{% endif %}", "test 'executable'"),
    ("{% include 'secrets.txt' %}", "tag 'include'"),
    ("{% exec 'import os' %}", "unknown tag 'exec'"),
]


def _hf_dir(tmp_path: Path, ours: Tokenizer, config: dict[str, Any]) -> Path:
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", **config}))
    return tmp_path


@pytest.mark.parametrize(("template", "refused"), ESCAPING_TEMPLATES)
def test_escaping_template_in_tokenizer_config_is_refused_at_load(
    tmp_path: Path, ours: Tokenizer, template: str, refused: str
) -> None:
    path = _hf_dir(tmp_path, ours, {"chat_template": template})
    with pytest.raises(CheckpointError, match=re.escape(refused)) as e:
        Tokenizer.from_hf_dir(str(path))
    assert str(e.value).startswith(f"{path / 'tokenizer_config.json'}: key chat_template: the chat template")


def test_escaping_template_in_chat_template_jinja_is_refused_at_load(tmp_path: Path, ours: Tokenizer) -> None:
    path = _hf_dir(tmp_path, ours, {})
    (path / "chat_template.jinja").write_text("{{ messages.__class__ }}")
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'chat_template.jinja'}: the chat template is refused")):
        Tokenizer.from_hf_dir(str(path))


def test_escaping_template_in_gguf_is_refused_at_load(tmp_path: Path, gguf_fields: dict[str, Any]) -> None:
    template = ("{{ ''.__class__.__mro__[1].__subclasses__() }}", GGUFValueType.STRING, None)
    path = write_vocab_gguf(tmp_path / "evil.gguf", gguf_fields, {"tokenizer.chat_template": template})
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: key tokenizer.chat_template: the chat template is refused: it reads the attribute '__class__'")):
        Tokenizer.from_gguf(path)


def test_computed_attribute_name_is_stopped_by_the_sandbox_when_rendered(tmp_path: Path, ours: Tokenizer) -> None:
    """A name the tree cannot show (built at render time) passes the load check; the sandbox refuses it then."""
    path = _hf_dir(tmp_path, ours, {"chat_template": "{{ messages[('__cla' ~ 'ss__')]() }}"})
    loaded = Tokenizer.from_hf_dir(str(path))
    with pytest.raises(ValueError, match="unsafe"):
        loaded.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_templates_load_and_render_as_transformers(cache_dir: str, arch: str) -> None:
    path = make_tiny(arch, cache_dir)
    rendered = Tokenizer.from_hf_dir(path).apply_chat_template(CONVERSATION)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    assert rendered == ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
