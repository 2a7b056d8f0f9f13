"""GGUF (every ggml type gguf-py can dequantize): each rank reads only its slice of the packed blocks.

This first member of the contract dequantizes the rank's blocks at load (GGUFSource.read, gguf-py's
dequantizer) into the compute dtype; keeping every type quantized in memory builds on it.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES
from torch import nn

from shardserve.workers.loader.gguf_source import find_gguf_file
from shardserve.workers.loader.source import CheckpointError, CheckpointSource
from shardserve.workers.quant.base import LinearMethod, MoEMethod, MoESpec, MoEWhich, QuantConfig, register
from shardserve.workers.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod


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

    @classmethod
    def detect(cls, model_path: str) -> GGUF | None:
        return cls() if find_gguf_file(model_path) else None

    def linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()

    def moe_method(self, prefix: str, which: MoEWhich) -> MoEMethod:
        return GGUFMoEMethod()
