"""GGUF checkpoints through gguf-py: metadata -> ModelConfig, HF-named tensors, per-rank sliced dequantization."""

from __future__ import annotations

import functools
import glob
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.models.config import ModelConfig

if TYPE_CHECKING:  # imported by the reads: opening a GGUF for its config (the driver) needs no torch
    import torch

# GGUF architecture name -> ours (and transformers' model_type)
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3",
}

# GGUF tensor name -> HF name; the converter's table (gguf-py constants.py TENSOR_NAMES), reversed.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # MoE: router, experts stacked [E, ...] as GGUF stores them, shared expert and its gate
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# where an architecture names a block tensor otherwise: gemma3's sandwich norms (gguf-py constants.py
# MODEL_TENSORS[GEMMA3]; transformers' Gemma3DecoderLayer), where ffn_norm is the pre-feedforward norm
_ARCH_BLOCK_NAMES = {
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_TOKENIZER_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
_UNQUANTIZED = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


# Tensors outside the layers' table that a GGUF may hold: rope_freqs.weight (llama.cpp's per-dimension RoPE
# frequency factors, llama3 scaling; read by models/llama.py) and blk.N.attn_rot_embd (HF's rotary_emb.inv_freq:
# gguf-py's MODEL_TENSOR_SKIP says the converter skips it, older files may carry it; recomputed from
# rope.freq_base). Any other unmapped tensor is a weight that no layer would load.
_EXTRA_TENSORS = re.compile(r"^(rope_freqs|blk\.\d+\.attn_rot_embd)\.weight$")


def _unknown_extra(architecture: str, unknown: list[tuple[str, str]]) -> CheckpointError:
    file, name = unknown[0]
    names = [n for _, n in unknown]
    return CheckpointError(
        file, name,
        f"no {architecture} layer loads this tensor, nor is it rope_freqs.weight or blk.N.attn_rot_embd.weight: a "
        f"model variant this build does not know; {len(names)} such tensor(s): {names[:8]}{' ...' * (len(names) > 8)}",
    )


def find_gguf_file(path: str) -> str | None:
    """A .gguf path, or the single (or first split) .gguf inside a directory."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.gguf")))
        firsts = [f for f in files if re.search(r"-00001-of-\d{5}\.gguf$", f)]
        if firsts:
            return firsts[0]
        if len(files) > 1:
            raise CheckpointError(path, None, f"several .gguf files, pass one of them: {files}")
        return files[0] if files else None
    return None


def hf_name(gguf_name: str, architecture: str = "") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(architecture, {})}
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return None


class GGUFSource(CheckpointSource):
    """One GGUF file (or its -0000k-of-0000N splits). Reads dequantize only the requested slice."""

    def __init__(self, path: str):
        super().__init__()
        first = find_gguf_file(path)
        if first is None:
            raise CheckpointError(path, None, "no .gguf file found")
        self.path = first
        files = _split_files(first)
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise CheckpointError(first, None, f"split GGUF is missing {len(absent)} of its {len(files)} files: {absent}")
        self._readers = []
        for f in files:
            self._readers.append(open_gguf_reader(f))
        self.metadata = _metadata(self._readers[0])
        self.architecture = self.metadata.get("general.architecture", "")
        self._tensors: dict[str, tuple[str, ReaderTensor]] = {}
        self.extra_tensors: dict[str, ReaderTensor] = {}  # no layer maps them: the model reads them by GGUF name
        unknown: list[tuple[str, str]] = []
        for f, reader in zip(files, self._readers):
            for t in reader.tensors:
                name = hf_name(t.name, self.architecture)
                if name is None:
                    self.extra_tensors[t.name] = t
                    if not _EXTRA_TENSORS.match(t.name):
                        unknown.append((f, t.name))
                else:
                    _check_readable_type(f, t)
                    self._tensors[name] = (f, t)
        self.model_config = self._model_config()
        if unknown:  # after the architecture check, whose refusal says more
            raise _unknown_extra(self.architecture, unknown)

    # ---- metadata ---------------------------------------------------------------------------
    def _model_config(self) -> ModelConfig:
        arch = self.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(
                self.path, None, f"unsupported general.architecture {arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}"
            )
        m = self.metadata

        def key(k: str, default: Any = None) -> Any:
            return m.get(f"{arch}.{k}", default)

        heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", hidden // heads))
        vocab = int(key("vocab_size", len(m.get("tokenizer.ggml.tokens", [])) or 0))
        if vocab == 0:
            vocab = int(self.shape("model.embed_tokens.weight")[0])
        scaling = None
        if key("rope.scaling.type") not in (None, "none"):
            scaling = {
                "rope_type": key("rope.scaling.type"),
                "factor": float(key("rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(key("rope.scaling.original_context_length", 0) or 0),
            }
        ours = GGUF_ARCHITECTURES[arch]
        return ModelConfig(
            architecture=ours,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length", 0) or 0),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            vocab_size=vocab,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rotary_dim=int(key("rope.dimension_count", head_dim)),
            max_position=int(key("context_length", 4096)),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            attention_bias=self.has("model.layers.0.self_attn.q_proj.bias"),
            qk_norm=self.has("model.layers.0.self_attn.q_norm.weight"),
            num_experts=int(key("expert_count", 0) or 0),
            num_experts_per_tok=int(key("expert_used_count", 0) or 0),
            moe_intermediate_size=int(key("expert_feed_forward_length", 0) or 0),
            shared_expert_intermediate_size=int(key("expert_shared_feed_forward_length", 0) or 0),
            # llama.cpp normalises the top-k weights for qwen3moe, not for qwen2moe (llama-model.cpp)
            norm_topk_prob=bool(key("expert_weights_norm", ours == "qwen3_moe")),
            **(_gemma3_fields(key, int(key("block_count")), head_dim) if ours == "gemma3" else {}),
        )

    # ---- tensors ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> ReaderTensor:
        return self._tensors[name][1]

    def file_of(self, name: str) -> str:
        return self._tensors[name][0] if name in self._tensors else self.path

    def qtype(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(self.tensor(name).tensor_type)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dims fastest-first; torch order is the reverse
        return tuple(int(d) for d in reversed(self.tensor(name).shape.tolist()))

    def read_quantized(self, name: str, dim: int | None, start: int, length: int) -> np.ndarray:
        """The packed bytes (or plain values) of a slice, rows in HF order; last axis is packed."""
        t = self.tensor(name)
        qtype = self.qtype(name)
        data = t.data.reshape(*self.shape(name)[:-1], -1)  # [..., bytes or values per row]
        rows = self._row_order(name)
        if rows is not None:
            if dim == 0:
                rows, dim = rows[start : start + length], None
            data = data[rows]
        if dim is None:
            return data
        ndim = data.ndim
        if dim != ndim - 1:
            index = [slice(None)] * ndim
            index[dim] = slice(start, start + length)
            return data[tuple(index)]
        if data.dtype != np.uint8:  # gguf-py hands F32/F16 back as values, not bytes
            return data[..., start : start + length]
        block, type_size = GGML_QUANT_SIZES[qtype]
        if start % block or length % block:
            raise CheckpointError(
                self.file_of(name),
                name,
                f"{qtype.name} blocks of {block} cannot be split at inputs [{start}, {start + length}): "
                f"choose a tp_size that divides the input dim into multiples of {block}",
            )
        return data[..., start // block * type_size : (start + length) // block * type_size]

    def _read(self, name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        qtype = self.qtype(name)
        data = self.read_quantized(name, dim, start, length)
        try:
            values = data if qtype == GGMLQuantizationType.F32 else dequantize(np.ascontiguousarray(data), qtype)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(self.file_of(name), name, f"cannot dequantize {qtype.name}: {e}") from e
        import torch

        return torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy off the mmap

    def _row_order(self, name: str) -> np.ndarray | None:
        """llama's converter permutes q/k rows for its rotary layout (convert_hf_to_gguf LlamaModel.permute);
        the inverse as a row gather, so a rank's slice is taken after undoing it."""
        if self.architecture != "llama" or not re.search(r"self_attn\.[qk]_proj\.(weight|bias)$", name):
            return None
        cfg = self.model_config
        heads = cfg.num_heads if ".q_proj" in name else cfg.num_kv_heads
        rows = self.shape(name)[0]
        half = rows // heads // 2
        h, i, j = np.meshgrid(np.arange(heads), np.arange(2), np.arange(half), indexing="ij")
        return (h * 2 * half + j * 2 + i).reshape(-1)  # hf row (h, i, j) lives at gguf row (h, j, i)


def _gemma3_fields(key, layers: int, head_dim: int) -> dict[str, Any]:
    """What gemma3 GGUF metadata leaves implicit, as llama.cpp sets it (llama-model.cpp, LLM_ARCH_GEMMA3): every
    6th layer global, the others a sliding window (none without the key) with rope base 10000
    (rope_freq_base_train_swa); attention scale 1/sqrt(head_dim), but 1/sqrt(n_embd / n_head) for the 62-layer
    27B (gemma_pytorch config.py), as query_pre_attn_scalar."""
    window = int(key("attention.sliding_window", 0) or 0) or None
    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    sliding = window is not None
    return {
        "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 or not sliding else "sliding_attention" for i in range(layers)],
        "rope_local_theta": 10000.0,
        "query_pre_attn_scalar": float(hidden // heads if layers == 62 else head_dim),
        "final_logit_softcapping": key("final_logit_softcapping") or None,
    }


class _CheckedReader(GGUFReader):
    """GGUFReader that checks each tensor's type and data range against the file before mapping it: gguf-py
    itself fails on a truncated file with a bare numpy reshape error that names no tensor."""

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        """gguf-py's _get, sliced from a plain ndarray view of the same map: slicing the np.memmap runs memmap's
        __array_finalize__ on each of the ~10^6 slices a 262k-token vocabulary takes (most of opening gemma3)."""
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        arr = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list[GGUFValueType]]:
        """gguf-py's, but an array is read whole rather than element by element (two numpy views and a recursion
        per element: ~1 s of every open of a 49k-token vocabulary's tokens, merges, types and scores, on the
        worker's way to ready). A scalar array is one part, a view of all its values; a string array is one
        memoryview part per string (what `ReaderField.contents()` decodes), without the length parts. Whole-array
        `contents()` reads as gguf-py's; the element index of a scalar array does not (no caller here uses it)."""
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        if len(raw_itype) < 1 or len(alen) < 1:
            raise ValueError(f"array header at byte {orig_offs} runs past the end of the file")
        itype, count, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, count)
            if len(values) != count:
                raise ValueError(f"array of {count} {itype.name} at byte {offs} runs past the end of the file")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING:  # arrays of arrays: gguf-py's walk
            return super()._get_field_parts(orig_offs, raw_type)
        buf = memoryview(self._plain)  # set by _get, which read the magic before any field
        order = "little" if self.endianess == GGUFEndian.LITTLE else "big"  # the file's, as __init__ read it
        size, strings = len(buf), []
        for _ in range(count):
            if offs + 8 > size:
                raise ValueError(f"string array at byte {orig_offs} runs past the end of the file")
            n = int.from_bytes(buf[offs : offs + 8], order)
            if offs + 8 + n > size:
                raise ValueError(f"string of {n} bytes at byte {offs} runs past the end of the file")
            strings.append(buf[offs + 8 : offs + 8 + n])
            offs += 8 + n
        return offs - orig_offs, [raw_itype, alen, *strings], list(range(2, 2 + count)), [GGUFValueType.ARRAY, itype]

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        path, size = str(self.data.filename), len(self.data)
        ranges = []
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                known = sorted(t.name for t in GGMLQuantizationType)
                raise CheckpointError(path, name, f"unknown ggml type id {int(raw_dtype[0])}; known: {known}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod(dims, dtype=np.uint64))
            if dims.size and int(dims[0]) % block:
                raise CheckpointError(path, name, f"{qtype.name} row of {int(dims[0])} values is not whole blocks of {block}")
            begin = int(start_offs + int(offset_tensor[0]))
            end = begin + n_elems * type_size // block
            if begin % self.alignment:
                raise CheckpointError(path, name, f"data offset {begin} is not aligned to {self.alignment} bytes")
            if end > size:
                raise CheckpointError(
                    path, name, f"truncated or lying header: the tensor needs bytes [{begin}, {end}), the file has {size}"
                )
            ranges.append((begin, end, name))
        ranges.sort()
        for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
            if begin < end:
                raise CheckpointError(path, second, f"data [{begin}, ...) overlaps tensor {first!r}, which ends at {end}")
        super()._build_tensors(start_offs, fields)


def open_gguf_reader(path: str) -> GGUFReader:
    try:
        return _CheckedReader(path)
    except CheckpointError:
        raise
    except Exception as e:  # gguf-py raises ValueError/IndexError/KeyError on a bad or truncated header
        size = os.path.getsize(path)
        raise CheckpointError(
            path, None, f"not a readable GGUF file ({size} bytes; truncated or corrupt header?): {type(e).__name__}: {e}"
        ) from None


@functools.cache
def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf-py dequantizes `qtype` to floats (one zero block as the probe); integer types are not weights."""
    if qtype in (GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64):
        return False
    if qtype in _UNQUANTIZED or qtype == GGMLQuantizationType.F64:
        return True
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _check_readable_type(path: str, t: ReaderTensor) -> None:
    """A model tensor whose ggml type gguf-py cannot dequantize fails at open, not at its first read."""
    qtype = GGMLQuantizationType(t.tensor_type)
    if not _dequantizable(qtype):
        supported = [q.name for q in GGMLQuantizationType if _dequantizable(q)]
        raise CheckpointError(path, t.name, f"ggml type {qtype.name} cannot be loaded as a weight; supported: {supported}")


def _split_files(first: str) -> list[str]:
    m = re.search(r"-00001-of-(\d{5})\.gguf$", first)
    if not m:
        return [first]
    n = int(m.group(1))
    return [first[: m.start()] + f"-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _TOKENIZER_ARRAYS:
            continue  # the vocabulary arrays are the tokenizer's to read (slow to decode, unused here)
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, TypeError) as e:
            raise CheckpointError(reader.data.filename, None, f"unreadable metadata key {key!r}: {e}") from e
    return out


def is_quantized(qtype: GGMLQuantizationType) -> bool:
    return qtype not in _UNQUANTIZED
