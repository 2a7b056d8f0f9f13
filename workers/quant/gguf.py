"""GGUF (every ggml type gguf-py can dequantize): each rank reads only its slice of the packed blocks.

Where the device's op table has an int4 kernel (`ops.int4_kernel`), linear layers whose sub-matrices are all
Q4_0 / Q4_1 stay 4-bit in memory: the rank's blocks are decoded (numpy) into q, scale and zero and packed for
that kernel. Every other type, MoE experts, and every layer on other devices are dequantized at load
(GGUFSource.read, gguf-py's dequantizer) into the compute dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from shardserve.workers.device.base import int4_dequantize
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
from shardserve.workers.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod

Q4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
Q4_GROUP = 32  # QK4_0 == QK4_1 (ggml-common.h): values per block, one scale (and min) each


class GGUFLinearMethod(UnquantizedLinearMethod):
    """Q4_0 / Q4_1 layers on a device with an int4 kernel: q [N, K] and scales_zeros [K/32, N, 2] packed by the
    layer's op table, applied by its int4_group_matmul. Otherwise the dequantized float weight (the parent's).
    Which of the two a layer took is the layer's `int4`, chosen at load from its sub-matrices' types and the op
    table: the method itself holds no per-layer state."""

    def load(self, layer: nn.Module, spec: LinearSpec, source: CheckpointSource) -> None:
        layer.int4 = bool(layer.ops.int4_kernel and isinstance(source, GGUFSource) and _all_q4(spec, source))
        super().load(layer, spec, source)

    def load_tensor(self, layer: nn.Module, spec: LinearSpec, source: CheckpointSource, t: TensorSpec) -> None:
        if t.name != "weight" or not layer.int4:
            return super().load_tensor(layer, spec, source, t)
        parts = [
            decode_q4(source.qtype(f"{sub}.weight"), _read_blocks(source, spec, sub, n, shard))
            for sub, n, shard in zip(spec.sub_prefixes, spec.output_sizes, spec.output_shards)
        ]
        q = np.concatenate([p[0] for p in parts], axis=0)  # [N_local, K_local]
        scales_zeros = np.concatenate([p[1] for p in parts], axis=1)  # [K_local/32, N_local, 2]
        layer.register_buffer("q", torch.from_numpy(q), persistent=False)
        layer.register_buffer("scales_zeros", torch.from_numpy(scales_zeros), persistent=False)

    def after_load(self, layer: nn.Module, spec: LinearSpec) -> None:
        if not layer.int4 or not hasattr(layer, "q"):
            return  # a float layer, or already packed
        packed, layer.scales_zeros = layer.ops.pack_int4(layer.q, layer.scales_zeros)
        layer.register_buffer("qweight", packed, persistent=False)
        del layer.q  # the decoded values are checkpoint-only

    def apply(self, layer: nn.Module, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        if not layer.int4:
            return super().apply(layer, x, is_prefill)
        y = layer.ops.int4_group_matmul(x, layer.qweight, Q4_GROUP, layer.scales_zeros)  # [T, K] -> [T, N]
        return y if layer.bias is None else y + layer.bias

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        """Dequantized from what the layer holds: equal to gguf-py's dequantize up to the rounding of d and
        m + 8d into the op table's scale dtype."""
        if not layer.int4:
            return super().reference_weight(layer)
        q = layer.ops.unpack_int4(layer.qweight, layer.scales_zeros, Q4_GROUP)  # [N_local, K_local]
        return int4_dequantize(q, layer.scales_zeros, Q4_GROUP)


def decode_q4(qtype: GGMLQuantizationType, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of Q4_0 / Q4_1 blocks [N, K/32 * type_size] uint8 -> q [N, K] uint8 in 0..15 and scales_zeros
    [K/32, N, 2] float32, with w = (q - 8) * scale + zero exactly as gguf-py's dequantize computes it.

    ggml-common.h: block_q4_0 {fp16 d; u8 qs[16]}, w = d (q - 8); block_q4_1 {fp16 d, m; u8 qs[16]},
    w = d q + m = d (q - 8) + (m + 8 d). qs[j] holds value j in its low nibble and j + 16 in its high
    nibble (gguf-py quants.py Q4_0/Q4_1.dequantize_blocks).
    """
    _, type_size = GGML_QUANT_SIZES[qtype]
    N = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(N, -1, type_size)  # [N, K/32, type_size]
    d = _fp16(b[..., 0:2])  # [N, K/32]
    if qtype == GGMLQuantizationType.Q4_1:
        zero, qs = _fp16(b[..., 2:4]) + 8 * d, b[..., 4:]  # m + 8d: exact in fp32 unless 2^13 apart
    else:
        zero, qs = np.zeros_like(d), b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, -1)  # [N, K/32, 32] -> [N, K]
    scales_zeros = np.stack([d, zero], axis=-1).transpose(1, 0, 2)  # [K/32, N, 2]
    return q, np.ascontiguousarray(scales_zeros)


def _fp16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] little-endian fp16 bytes -> [...] float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _all_q4(spec: LinearSpec, source: GGUFSource) -> bool:
    """Every sub-matrix Q4_0/Q4_1 and the rank's K slice whole blocks (else the float path, which names
    the misaligned split in its error)."""
    k = spec.input_shard
    if spec.parallel == "row" and (k.start % Q4_GROUP or k.length % Q4_GROUP):
        return False
    subs = [f"{s}.weight" for s in spec.sub_prefixes]
    return all(source.has(n) and source.qtype(n) in Q4_TYPES for n in subs)


def _read_blocks(source: GGUFSource, spec: LinearSpec, sub: str, n: int, shard: Shard) -> np.ndarray:
    """This rank's packed rows [N_local, K_local/32 * type_size] of sub-matrix `sub` (full N = n), HF row order."""
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


class GGUFMoEMethod(UnquantizedMoEMethod):
    """GGUF stores a layer's experts stacked: ffn_{gate,up}_exps [E, I, H] and ffn_down_exps [E, H, I]
    (GGUFSource names them experts.{gate,up,down}_proj.weight). One sliced read per sub-matrix: the
    expert axis under expert parallelism, the I axis under TP (for down, the packed axis: I / tp must
    be a multiple of the block size, which GGUFSource checks)."""

    def load(self, layer: nn.Module, spec: MoESpec, source: CheckpointSource) -> None:
        parts = [_read_stacked(source, spec, f"{spec.prefix}.{sub}.weight") for sub in spec.sub_names]
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # w13: [E_local, 2 * I_local, H]
        layer.register_buffer("weight", w.to(spec.dtype), persistent=False)


def _read_stacked(source: CheckpointSource, spec: MoESpec, name: str) -> torch.Tensor:
    """This rank's [E_local, I_local, H] (gate/up) or [E_local, H, I_local] (down) of a stacked tensor."""
    E, H, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
    full = (E, inter, H) if spec.which == "w13" else (E, H, inter)
    if not source.has(name):
        gguf_name = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}[name.split(".")[-2]]
        raise CheckpointError(
            source.path, name, f"missing: stacked experts of {spec.prefix} ({spec.which}) are read from GGUF "
            f"blk.N.ffn_{gguf_name}_exps, shape {full} in torch order"
        )
    experts, rows = spec.expert_shard, spec.intermediate_shard
    i_axis = 1 if spec.which == "w13" else 2
    if i_axis == 2 and rows.length < inter:
        _check_block_split(source, spec, name)
    if experts.length < E:
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
    _linear = GGUFLinearMethod()  # stateless: one instance serves every layer
    _moe = GGUFMoEMethod()

    @classmethod
    def detect(cls, model_path: str) -> GGUF | None:
        return cls() if find_gguf_file(model_path) else None

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        return self._linear

    def moe_method(self, spec: MoESpec) -> MoEMethod:
        return self._moe
