"""GGUF (every ggml type gguf-py can dequantize), kept quantized: each rank reads only its slice of the blocks.

Kept quantized by default, on every device: a layer whose sub-matrices are all integer types (gguf_groups.py's
table: Q4_0..Q8_0, Q2_K..Q6_K, IQ4_NL/IQ4_XS, TQ1_0/TQ2_0, MXFP4, NVFP4) holds q, scale and zero per group,
exactly the checkpoint's values, packed by the device's op table (`pack_groups`: on the CPU our gq kernel, which
holds every type at its own width with its exact scales, or ATen's int4 kernel where no C compiler builds ours;
the NPU's npu_weight_quant_batchmatmul; the plain-torch reference elsewhere) and multiplied by its group_matmul.
Fused layers (qkv, gate_up, an MoE's w13) whose parts differ in type share the finer group and a zero. Stacked
MoE experts (ffn_*_exps) stay quantized under TP and EP; the token embedding is gathered from its quantized rows,
and the LM head (tied or not) multiplies the quantized matrix, a tied one held once (embed_head.py).
Memory on the CPU (gq), bytes per value against the file: Q4_0 0.56 (0.56), Q4_1 0.63 (0.63), Q5_0 0.69 (0.69),
Q8_0 1.06 (1.06), Q4_K 0.75 (0.56: a float32 scale and zero per 32, d * sc not being exact in float16), Q5_K 0.88
(0.69), Q6_K 1.0 (0.82), Q3_K 0.75 (0.43) and Q2_K 1.0 (0.33): nibbles and float32 scales (and Q2_K's zeros) per 16.

Dequantized at load into the compute dtype (gguf-py's dequantizer): F32/F16/BF16 and the grid types
(IQ1_*, IQ2_*, IQ3_*), a layer mixing those with integer types, a TP split inside a block, and every layer under
`--gguf-dequantize` (SGLang's behaviour on Ascend: more memory, no kernel rounding).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from torch import nn

from shardserve.workers.loader.gguf_source import GGUFSource, find_gguf_file
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.quant.base import (
    LinearMethod,
    LinearSpec,
    MoEMethod,
    MoESpec,
    QuantConfig,
    Shard,
    TensorSpec,
    register,
)
from shardserve.workers.quant.gguf_groups import Groups, decodable, decode
from shardserve.workers.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod, expert_rows


class GGUFLinearMethod(UnquantizedLinearMethod):
    """Integer types kept quantized (`layer.qweight`, a GroupWeight of the layer's op table) or, where the layer
    cannot be (see the module docstring), the dequantized float weight (the parent's). Which one a layer took is
    the layer's `grouped`, chosen at load: the method holds only the format's option."""

    def __init__(self, dequantize: bool = False):
        self.dequantize = dequantize

    def load(self, layer: nn.Module, spec: LinearSpec, source: CheckpointSource) -> None:
        layer.grouped = not self.dequantize and isinstance(source, GGUFSource) and _groupable(spec, source)
        super().load(layer, spec, source)

    def load_tensor(self, layer: nn.Module, spec: LinearSpec, source: CheckpointSource, t: TensorSpec) -> None:
        if t.name != "weight" or not layer.grouped:
            return super().load_tensor(layer, spec, source, t)
        parts = []
        for sub, n, shard in zip(spec.sub_prefixes, spec.output_sizes, spec.output_shards):
            name = f"{sub}.weight"
            parts.append(decode_blocks(source, name, _read_blocks(source, spec, sub, n, shard)))
        _hold_groups(layer, merge_groups(parts, axis=0))

    def after_load(self, layer: nn.Module, spec: LinearSpec) -> None:
        if layer.grouped and hasattr(layer, "q"):
            _pack_held(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        if not layer.grouped:
            return super().apply(layer, x, is_prefill)
        y = layer.ops.group_matmul(x, layer.qweight)  # [T, K] -> [T, N]
        return y if layer.bias is None else y + layer.bias

    def group_weight(self, layer: nn.Module):
        return layer.qweight if layer.grouped else None

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """What the layer multiplies by: gguf-py's dequantize, up to the rounding the op table's layout states."""
        return layer.ops.group_dequantize(layer.qweight) if layer.grouped else super().reference_weight(layer)


def decode_blocks(source: CheckpointSource, name: str, blocks: np.ndarray) -> Groups:
    """gguf_groups.decode with the file and tensor in its errors."""
    qtype = source.qtype(name)
    try:
        groups = decode(qtype, blocks)
    except ValueError as e:
        raise CheckpointError(source.file_of(name), name, str(e)) from None
    if groups is None:
        raise CheckpointError(source.file_of(name), name, f"{qtype.name} is not an integer type")
    return groups


def merge_groups(parts: list[Groups], axis: int) -> Groups:
    """Sub-matrices stacked along N (`axis`): one group size (the finest; ggml groups are 16, 32 or 256, each
    dividing the next) and a zero for all where any has one. Exact: only scales are repeated."""
    if len(parts) == 1:
        return parts[0]
    group = min(p.group for p in parts)
    parts = [p.regroup(group) for p in parts]
    if any(p.zero is not None for p in parts):
        parts = [p.with_zero() for p in parts]
    zero = None if parts[0].zero is None else np.concatenate([p.zero for p in parts], axis=axis)
    return Groups(
        np.concatenate([p.q for p in parts], axis=axis), np.concatenate([p.scale for p in parts], axis=axis), zero, group
    )


def _hold_groups(layer: nn.Module, g: Groups) -> None:
    """The decoded pieces as buffers until after_load packs them (checkpoint-only: packing drops them)."""
    layer.register_buffer("q", torch.from_numpy(g.q), persistent=False)
    layer.register_buffer("scale", torch.from_numpy(np.ascontiguousarray(g.scale)), persistent=False)
    zero = None if g.zero is None else torch.from_numpy(np.ascontiguousarray(g.zero))
    layer.register_buffer("zero", zero, persistent=False)
    layer.group = g.group


def _pack_held(layer: nn.Module, lookup: bool = False) -> None:
    layer.qweight = layer.ops.pack_groups(layer.q, layer.scale, layer.zero, layer.group, lookup=lookup)
    del layer.q, layer.scale, layer.zero


def _groupable(spec: LinearSpec, source: GGUFSource) -> bool:
    """Every sub-matrix an integer type, and the rank's K slice whole blocks (else the float path, which names
    the misaligned split in its error)."""
    subs = [f"{s}.weight" for s in spec.sub_prefixes]
    if not all(source.has(n) and decodable(source.qtype(n)) for n in subs):
        return False
    k = spec.input_shard
    blocks = [GGML_QUANT_SIZES[source.qtype(n)][0] for n in subs]
    return spec.parallel != "row" or all(k.start % b == 0 and k.length % b == 0 for b in blocks)


def _read_blocks(source: GGUFSource, spec: LinearSpec, sub: str, n: int, shard: Shard) -> np.ndarray:
    """This rank's packed rows [N_local, K_local/block * type_size] of sub-matrix `sub` (full N = n), HF row order."""
    name, full = f"{sub}.weight", (n, spec.input_size)
    if source.shape(name) != full:
        found = source.shape(name)
        raise CheckpointError(source.file_of(name), name, f"expected shape {full} for {spec.prefix}, found {found}")
    source.consumed.add(name)
    if spec.parallel == "column":
        return source.read_quantized(name, 0, shard.start, shard.length)
    if spec.parallel == "row":
        return source.read_quantized(name, 1, spec.input_shard.start, spec.input_shard.length)
    return source.read_quantized(name, None, 0, 0)


def read_vocab_groups(source: CheckpointSource, name: str, start: int, length: int) -> Groups | None:
    """Rows [start, start + length) of an embedding or LM head kept quantized, or None (a float type)."""
    if not isinstance(source, GGUFSource) or not source.has(name) or not decodable(source.qtype(name)):
        return None
    source.consumed.add(name)
    return decode_blocks(source, name, source.read_quantized(name, 0, start, length))


class GGUFMoEMethod(UnquantizedMoEMethod):
    """GGUF stores a layer's experts stacked: ffn_{gate,up}_exps [E, I, H] and ffn_down_exps [E, H, I]
    (GGUFSource names them experts.{gate,up,down}_proj.weight). One sliced read per sub-matrix: the expert axis
    under expert parallelism, the I axis under TP (for down, the packed axis: I / tp must be a multiple of the
    block size, checked). Kept quantized (`layer.qweight` [E_local, N_local, K_local], grouped_group_matmul)
    when every sub-matrix is an integer type, else dequantized at load (the parent's float path)."""

    def __init__(self, dequantize: bool = False):
        self.dequantize = dequantize

    def load(self, layer: nn.Module, spec: MoESpec, source: CheckpointSource) -> None:
        names = [f"{spec.prefix}.{sub}.weight" for sub in spec.sub_names]
        for name in names:
            _check_stacked(source, spec, name)
        layer.grouped = not self.dequantize and all(decodable(source.qtype(n)) for n in names)
        if layer.grouped:
            parts = [decode_blocks(source, n, _read_stacked_blocks(source, spec, n)) for n in names]
            _hold_groups(layer, merge_groups(parts, axis=1))  # w13: [E_local, 2 * I_local, H]
            return
        parts = [_read_stacked(source, spec, n) for n in names]
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # w13: [E_local, 2 * I_local, H]
        layer.register_buffer("weight", w.to(spec.dtype), persistent=False)

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        if layer.grouped:
            _pack_held(layer)
        else:
            super().after_load(layer, spec)

    def apply(self, layer, x, group_counts, ops, is_prefill):
        if not layer.grouped:
            return super().apply(layer, x, group_counts, ops, is_prefill)
        y = ops.grouped_group_matmul(x, layer.qweight, group_counts)  # [M, K] x [E, N, K] -> [M, N]
        return y if layer.bias is None else y + expert_rows(layer.bias, group_counts, y.shape[0])

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.ops.group_dequantize(layer.qweight) if layer.grouped else super().reference_weight(layer)


def _full_stacked(spec: MoESpec) -> tuple[int, int, int]:
    E, H, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
    return (E, inter, H) if spec.which == "w13" else (E, H, inter)


def _check_stacked(source: CheckpointSource, spec: MoESpec, name: str) -> None:
    full = _full_stacked(spec)
    if not source.has(name):
        gguf_name = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}[name.split(".")[-2]]
        raise CheckpointError(
            source.path, name, f"missing: stacked experts of {spec.prefix} ({spec.which}) are read from GGUF "
            f"blk.N.ffn_{gguf_name}_exps, shape {full} in torch order"
        )
    if tuple(source.shape(name)) != full:
        found = tuple(source.shape(name))
        raise CheckpointError(source.file_of(name), name, f"expected shape {full} for {spec.prefix}, found {found}")
    if spec.which == "w2" and spec.intermediate_shard.length < spec.intermediate_size:
        _check_block_split(source, spec, name)


def _read_stacked_blocks(source: GGUFSource, spec: MoESpec, name: str) -> np.ndarray:
    """This rank's blocks [E_local, N_local, K_local / block * type_size] of a stacked tensor."""
    source.consumed.add(name)
    experts, rows = spec.expert_shard, spec.intermediate_shard
    data = source.read_quantized(name, None, 0, 0)[experts.start : experts.start + experts.length]  # [E_l, N, bytes]
    if spec.which == "w13":
        return data[:, rows.start : rows.start + rows.length]
    block, type_size = GGML_QUANT_SIZES[source.qtype(name)]
    return data[..., rows.start // block * type_size : (rows.start + rows.length) // block * type_size]


def _read_stacked(source: CheckpointSource, spec: MoESpec, name: str) -> torch.Tensor:
    """This rank's [E_local, I_local, H] (gate/up) or [E_local, H, I_local] (down) of a stacked tensor, dequantized."""
    full = _full_stacked(spec)
    experts, rows = spec.expert_shard, spec.intermediate_shard
    i_axis = 1 if spec.which == "w13" else 2
    if experts.length < spec.num_experts:
        w = source.read(name, dim=0, start=experts.start, length=experts.length, expect_shape=full)
        return w.narrow(i_axis, rows.start, rows.length)
    return source.read(name, dim=i_axis, start=rows.start, length=rows.length, expect_shape=full)


def _check_block_split(source: CheckpointSource, spec: MoESpec, name: str) -> None:
    """down_exps is split along its packed axis under TP: each rank's I slice must hold whole blocks."""
    qtype = source.qtype(name)
    block = GGML_QUANT_SIZES[qtype][0]
    rows = spec.intermediate_shard
    if rows.start % block or rows.length % block:
        raise CheckpointError(
            source.file_of(name), name,
            f"{qtype.name} blocks of {block} cannot be split at moe_intermediate_size [{rows.start}, "
            f"{rows.start + rows.length}) of {spec.intermediate_size}: choose a tp_size that keeps it a multiple "
            f"of {block} per rank, or enable expert parallelism (each rank then reads its experts whole)",
        )


@register
class GGUF(QuantConfig):
    name = "gguf"

    def __init__(self, dequantize: bool = False):
        self.dequantize = dequantize
        self._linear = GGUFLinearMethod(dequantize)  # one instance serves every layer
        self._moe = GGUFMoEMethod(dequantize)

    @classmethod
    def detect(cls, model_path: str) -> GGUF | None:
        return cls() if find_gguf_file(model_path) else None

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        return self._linear

    def moe_method(self, spec: MoESpec) -> MoEMethod:
        return self._moe

    def vocab_groups(self, source: CheckpointSource, name: str, start: int, length: int) -> Groups | None:
        """An embedding's or LM head's rows kept quantized, or None to read them as floats."""
        return None if self.dequantize else read_vocab_groups(source, name, start, length)
