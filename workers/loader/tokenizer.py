"""Text <-> token ids for a model, rebuilt from GGUF metadata or a HF directory, and its chat template."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from shardserve.workers.loader.gguf_source import open_gguf_reader
from shardserve.workers.loader.source import CheckpointError

logger = logging.getLogger(__name__)

# llama.cpp LLAMA_TOKEN_TYPE_* (gguf-py constants.py TokenType) as stored in tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn; llama.cpp llama-vocab.cpp adds these to special_eog_ids by their text.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
)

NO_CHAT_TEMPLATE = "model has no chat template; pass a prompt to /v1/completions instead"

# Attributes that reach Python internals without a leading underscore: those Jinja's sandbox refuses
# (jinja2/sandbox.py is_internal_attribute: generator/coroutine frames and code, `mro`, frame and traceback
# fields) and Python 2's function and method internals that old sandbox escapes name.
_UNSAFE_ATTRIBUTES = frozenset({
    "func_closure", "func_code", "func_dict", "func_defaults", "func_globals", "im_class", "im_func", "im_self",
    "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_code", "ag_frame", "tb_frame", "tb_next", "f_back",
    "f_builtins", "f_code", "f_globals", "f_locals", "mro",
})
# Tags that need a template loader, which transformers' environment has not: no template is meant to use them.
_REFUSED_NODES = {nodes.Extends: "extends", nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import"}

# Pre-tokenizer regexes, transcribed from llama.cpp llama-vocab.cpp (llm_tokenizer_bpe): llama.cpp runs
# them one after the other, each splitting the pieces of the previous one and keeping unmatched text as
# pieces too -- a chain of tokenizers `Split(..., "isolated")`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + (
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
# Code points that Unicode normalization rewrites (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A) are
# escaped, so that no editor's NFC pass can change the class.
_DEEPSEEK_LLM = (
    r"[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp splits text for one `tokenizer.ggml.pre` value before BPE merges."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole piece found in the vocab is taken as is (llama3 family)
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_PRE_GROUPS: tuple[tuple[tuple[str, ...], PreTokenizerSpec], ...] = (
    (("default",), PreTokenizerSpec(_DEFAULT)),
    (("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4"), PreTokenizerSpec((_GPT2,))),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"),
        PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    (("dbrx", "smaug-bpe"), PreTokenizerSpec((_LLAMA3,))),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), PreTokenizerSpec((_QWEN2,))),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        PreTokenizerSpec((r"\p{N}", _GPT2)),
    ),
    (("deepseek-llm",), PreTokenizerSpec(_DEEPSEEK_LLM)),
    (("deepseek-coder",), PreTokenizerSpec(_DEEPSEEK_CODER)),
)
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {name: spec for names, spec in _PRE_GROUPS for name in names}


@dataclass(eq=False)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts and chat template a server needs."""

    backend: Backend
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    chat_template: str | None = None
    chat_template_origin: str = "chat template"  # where it was read from, for the error that refuses it
    add_bos_token: bool = False
    add_eos_token: bool = False
    extra_stop_ids: set[int] = field(default_factory=set)  # e.g. generation_config.json eos ids
    stop_token_ids: set[int] = field(init=False)

    def __post_init__(self) -> None:
        added = self.backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self.stop_token_ids = _stop_ids(self.backend, self.eos_token_id) | self.extra_stop_ids
        # compiled and checked here, at load: a template is checkpoint content, refused before serving
        self._template = compile_chat_template(self.chat_template, self.chat_template_origin) if self.chat_template else None

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Rebuild the tokenizer from a GGUF file's `tokenizer.*` metadata, the way llama.cpp reads it."""
        return cls.from_gguf_metadata(_read_gguf_tokenizer_metadata(path), source=path)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF metadata") -> Tokenizer:
        """Build from already-read `tokenizer.*` key/values (`GGUFReaderField.contents()` of each)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens, vocab = _vocab(meta)
        if kind == "gpt2":
            backend, add_bos = _byte_level_bpe(meta, vocab)
        elif kind == "llama":
            backend, add_bos = _sentencepiece_bpe(meta, tokens, vocab)
        else:
            raise ValueError(
                f"{source}: tokenizer.ggml.model = {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece BPE)"
            )
        _add_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [])
        return cls(
            backend=backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            chat_template_origin=f"{source}: key tokenizer.chat_template",
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and, if present, `generation_config.json`."""
        backend = Backend.from_file(os.path.join(path, "tokenizer.json"))
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        bos_id = _token_id(backend, config.get("bos_token"))
        eos_id = _token_id(backend, config.get("eos_token"))
        # Without explicit flags, ask the post-processor what it adds, as transformers would run it.
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        add_bos = config.get("add_bos_token", bos_id is not None and full[:1] == [bos_id] != plain[:1])
        add_eos = config.get("add_eos_token", eos_id is not None and full[-1:] == [eos_id] != plain[-1:])
        gen_eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        template, origin = _hf_chat_template(path, config)
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            chat_template=template,
            chat_template_origin=origin,
            add_bos_token=bool(add_bos),
            add_eos_token=bool(add_eos),
            extra_stop_ids=set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else []),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str:
        return self._token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self._token_text(self.eos_token_id)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id) or ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are always parsed as such."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's Jinja template, as transformers' `apply_chat_template` does."""
        if self._template is None:
            raise ValueError(NO_CHAT_TEMPLATE)
        messages = [_flatten_content(m) for m in messages]
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except jinja2.TemplateError as e:  # the template's raise_exception(), or a field it needs is missing
            raise ValueError(f"the chat template refused the messages: {e}") from e
        except (ArithmeticError, AttributeError, LookupError, TypeError) as e:  # a bug in the template itself
            raise ValueError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body: transformers marks assistant spans with
    it for training masks, which serving does not need."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def compile_chat_template(source: str, origin: str = "chat template") -> jinja2.Template:
    """`source` compiled in the sandboxed environment transformers renders chat templates in
    (chat_template_utils.py), once its syntax tree is checked; CheckpointError naming `origin` if refused."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which templates do not expect.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as e:  # an unknown tag among them
        raise CheckpointError(origin, None, f"the chat template does not parse: {e} (line {e.lineno})") from None
    if refused := _refused_construct(tree, env):
        raise CheckpointError(origin, None, f"the chat template is refused: it {refused}")
    # what the tree cannot show (a computed attribute name) the sandbox refuses when the template runs
    return env.from_string(tree)


def _refused_construct(tree: nodes.Template, env: jinja2.Environment) -> str | None:
    """What in the template's syntax tree reaches for Python internals, or for what transformers' environment
    lacks: an attribute or item named `_...` or in _UNSAFE_ATTRIBUTES (`x.__class__`, `x['__globals__']`,
    `x|attr('__init__')`), a dunder variable, an unknown filter or test, a loader tag. All of them, in source order."""
    found: list[str] = []
    for node in _post_order(tree):
        at = f"(line {node.lineno})"
        name = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const):
            name = str(node.args[0].value)
        if name is not None and (name.startswith("_") or name in _UNSAFE_ATTRIBUTES):
            found.append(f"reads the attribute {name!r} {at}")
        elif isinstance(node, nodes.Name) and node.name.startswith("__"):
            found.append(f"reads the variable {node.name!r} {at}")
        elif isinstance(node, nodes.Filter) and node.name not in env.filters:
            found.append(f"uses the filter {node.name!r}, which transformers' environment does not offer {at}")
        elif isinstance(node, nodes.Test) and node.name not in env.tests:
            found.append(f"uses the test {node.name!r}, which transformers' environment does not offer {at}")
        elif type(node) in _REFUSED_NODES:
            found.append(f"uses the tag {_REFUSED_NODES[type(node)]!r}, which needs a template loader {at}")
    return "; ".join(dict.fromkeys(found)) or None


def _post_order(node: nodes.Node):
    for child in node.iter_child_nodes():
        yield from _post_order(child)
    yield node


def _flatten_content(message: dict) -> dict:
    """OpenAI-style content parts -> one string; templates written for text expect `content` to be a str."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise ValueError(
                f"messages[].content part of type {kind!r} is not supported; only 'text' parts are"
            )
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _stop_ids(backend: Backend, eos_id: int | None) -> set[int]:
    names = set(END_OF_TURN_TOKENS)
    # gpt-oss writes <|end|> between its channels; only <|return|>/<|call|> end its turn (llama-vocab.cpp).
    if backend.token_to_id("<|return|>") is not None:
        names.discard("<|end|>")
    ids = {i for i in map(backend.token_to_id, names) if i is not None}
    return ids if eos_id is None else ids | {eos_id}


def _read_gguf_tokenizer_metadata(path: str) -> dict[str, Any]:
    reader = open_gguf_reader(path)  # the checked reader: its field parsing is ~5x faster than GGUFReader's
    return {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}


def _vocab(meta: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """Token texts and text -> id, as llama.cpp's llama_vocab::load builds them."""
    # llama.cpp names an empty token "[EMPTY_<id>]" so that every id keeps a distinct text.
    tokens = [tok or f"[EMPTY_{i}]" for i, tok in enumerate(meta["tokenizer.ggml.tokens"])]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if vocab.setdefault(tok, i) != i:
            raise ValueError(
                f"duplicate token in tokenizer.ggml.tokens: {tok!r} has ids {vocab[tok]} and {i}"
            )
    return tokens, vocab


def _bpe_merges(merges: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs, split at the first space after position 0 as llama.cpp does."""
    pairs = []
    for merge in merges:
        pos = merge.find(" ", 1)
        left, right = merge[:pos], merge[pos + 1 :]
        # tokenizers rejects a merge whose parts are not in the vocab; llama.cpp just never applies it.
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    if len(pairs) != len(merges):
        logger.warning("dropped %d merges whose pieces are not in the vocabulary", len(merges) - len(pairs))
    return pairs


def _byte_level_bpe(meta: dict[str, Any], vocab: dict[str, int]) -> tuple[Backend, bool]:
    """GPT-2 style byte-level BPE: the regex split of the file's pre type, then merges on byte symbols."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        logger.warning("unknown tokenizer.ggml.pre %r; splitting text with the gpt2 regex", pre)
        spec = PreTokenizerSpec((_GPT2,))
    merges = _bpe_merges(meta.get("tokenizer.ggml.merges", []), vocab)
    backend = Backend(models.BPE(vocab, merges, ignore_merges=spec.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, spec.add_bos


def _sentencepiece_bpe(
    meta: dict[str, Any], tokens: list[str], vocab: dict[str, int]
) -> tuple[Backend, bool]:
    """SentencePiece BPE as llama.cpp runs it (llm_tokenizer_spm): spaces become `▁`, unknown bytes `<0xNN>`.

    The file has scores, not merges; the merges are the splits of each normal piece into two pieces, best
    score first (transformers' `generate_merges`). llama.cpp prefixes a space to every text fragment,
    including those after a special token, which is `Prepend` as a normalizer: it runs per fragment.
    """
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    bpe = models.BPE(
        vocab,
        _merges_from_scores(tokens, scores, types, vocab),
        unk_token=tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Backend(bpe)
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    escape = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if space_prefix else escape
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if space_prefix else steps)
    return backend, True


def _merges_from_scores(
    tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    candidates = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[i], vocab[left], vocab[right], left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _add_special_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens.

    Both are then matched whole in the text before any split, as llama.cpp's tokenizer_st_partition
    does; only special ones are dropped by decode(skip_special_tokens=True), as llama.cpp renders
    user-defined tokens but not control ones.
    """
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == USER_DEFINED
    ]
    # Their texts are in the vocab, so tokenizers keeps their ids and the vocabulary size.
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_id(backend: Backend, token: str | dict | None) -> int | None:
    # tokenizer_config.json writes special tokens either as text or as a serialized AddedToken.
    text = token.get("content") if isinstance(token, dict) else token
    return None if text is None else backend.token_to_id(text)


def _hf_chat_template(path: str, config: dict[str, Any]) -> tuple[str | None, str]:
    """The template from `chat_template.jinja` (newer transformers) or `tokenizer_config.json`, and where from."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read(), jinja_file
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template, f"{os.path.join(path, 'tokenizer_config.json')}: key chat_template"
