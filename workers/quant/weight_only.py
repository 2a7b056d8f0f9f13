"""Integer weight-only linears (W4A16, W8A16, ...) as GPTQ, AWQ, AutoRound and compressed-tensors store them: what the
formats share once their bits are unpacked.

Each format's method unpacks a rank's checkpoint tensors into one canonical form, `Unpacked`: unsigned values
u [.., N, K_local] in [0, 2^b), a float scale and zero per (output, group) and the group of each input row, g_idx
[K_local], so that w[n, k] = (u[n, k] - zero[n, g]) * scale[n, g] with g = g_idx[k]. `pack` then lays that out for
the device's group kernel (the op table's `pack_groups`, w = q * s + z per group of G along K: the CPU's ATen int4
kernel, the NPU's npu_weight_quant_batchmatmul with antiquant scale and offset, the plain-torch reference):

    q = u - 2^(b-1) (int8: [-8, 7] for 4 bits, [-128, 127] for 8), s = scale, z = (2^(b-1) - zero) * scale

The input rows are put in group order first: rows of one group become one run of G slots, a run shorter than G
(a partial last group, K = 576 with G = 128; a row-parallel slice that starts or ends inside a group; act-order
g_idx split over TP ranks) padded with slots whose activation is zero. Where the groups are already in order and
whole (the common case) nothing is gathered at run time; otherwise each call gathers x's columns once
(`k_index`, -1 for a zero slot). Weights stay b-bit integers in memory; the float expansion is only transient,
where a table's kernel cannot take the layout (its docstring says where).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.workers.quant.base import LinearMethod, LinearSpec, MoEMethod, MoESpec
from shardserve.workers.quant.unquantized import expert_rows

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the op tables' kernels take (CPU int4, NPU antiquant)


@dataclass
class Unpacked:
    """w [.., N, K] = (u - zero[.., g_idx]) * scale[.., g_idx] along K. zero None: the symmetric midpoint 2^(b-1)."""

    u: torch.Tensor  # integer [.., N, K], values in [0, 2^bits)
    scale: torch.Tensor  # float32 [.., N, G_total]
    zero: torch.Tensor | None  # float32 [.., N, G_total] or None
    g_idx: torch.Tensor  # int64 [K]: the group (an index into scale's last axis) of each input row
    bits: int
    group: int  # G: rows per whole group (K for one group per channel)

    def dequantize(self) -> torch.Tensor:
        s = self.scale.float().index_select(-1, self.g_idx)  # [.., N, K]
        z = float(1 << (self.bits - 1)) if self.zero is None else self.zero.float().index_select(-1, self.g_idx)
        return (self.u.float() - z) * s


def trivial_g_idx(start: int, length: int, group: int) -> torch.Tensor:
    """The g_idx of rows [start, start + length) without act order: k // G."""
    return torch.arange(start, start + length, dtype=torch.int64) // group


# ---- bit unpacking (values lowest bits first) ---------------------------------------------------------------------
def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [.., R, C] holding 32/b values per element along R -> int16 [.., R * 32/b, C] (GPTQ qweight)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # [per]
    v = (packed.unsqueeze(-2) >> shifts.view(per, 1)) & ((1 << bits) - 1)  # [.., R, per, C]
    return v.flatten(-3, -2).to(torch.int16)


def unpack_along_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [.., R, C] holding 32/b values per element along C -> int16 [.., R, C * 32/b] (GPTQ qzeros,
    compressed-tensors weight_packed). `order`: output value i of an element is the one at bit position order[i]
    (AWQ's interleave), None for position i."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # [per]
    v = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [.., R, C, per]
    if order is not None:
        v = v[..., list(order)]
    return v.flatten(-2).to(torch.int16)


def check_bits(bits: int, where: str, supported: tuple[int, ...] = (2, 4, 8)) -> None:
    if bits not in supported:
        raise ValueError(f"{where}: {bits}-bit weights are not served (supported: {list(supported)})")


# ---- the kernel layout --------------------------------------------------------------------------------------------
def runs(g_idx: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """Rows regrouped: (groups present [P] ascending, k_index [P * R] (row of each slot, -1 a zero slot), whether
    k_index is the identity on a prefix with only zero slots after it, R the slots per group). R is G, or less where
    no group of this slice holds G rows (a row-parallel slice of one group per channel, act order split over ranks):
    the longest run rounded up to 32, so that such a slice is not padded back to whole groups."""
    present, counts = torch.unique(g_idx, return_counts=True)
    longest = int(counts.max())
    if longest > group:
        raise ValueError(f"a group holds {longest} rows, more than the group size {group}")
    run = group if group < 32 else min(group, -(-longest // 32) * 32)
    order = torch.argsort(g_idx, stable=True)  # rows sorted by group
    slot_of_group = torch.arange(len(present)) * run  # first slot of each present group
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each present group
    rank_in_group = torch.arange(len(g_idx)) - torch.repeat_interleave(starts, counts)
    slots = torch.repeat_interleave(slot_of_group, counts) + rank_in_group  # slot of each sorted row
    k_index = torch.full((len(present) * run,), -1, dtype=torch.int64)
    k_index[slots] = order
    K = len(g_idx)
    prefix = bool((k_index[:K] == torch.arange(K)).all()) and bool((k_index[K:] == -1).all())
    return present, k_index, prefix, run


def pack(layer: nn.Module, w: Unpacked) -> None:
    """Lay `w` out for the layer's op table: layer.qweight (a GroupWeight [.., N, P * G]), layer.k_index (None
    when x only needs zero padding to layer.k_slots), layer.k_in (K)."""
    present, k_index, prefix, group = runs(w.g_idx, w.group)
    mid = 1 << (w.bits - 1)
    scale = w.scale.float().index_select(-1, present)  # [.., N, P]
    zero = None if w.zero is None else (mid - w.zero.float().index_select(-1, present)) * scale
    sub = next((g for g in KERNEL_GROUPS if group % g == 0), group) if group not in KERNEL_GROUPS else group
    if sub != group:  # runs of 576 (one scale per channel) or 96: the same scales over groups a kernel takes, exact
        scale = scale.repeat_interleave(group // sub, dim=-1)
        zero = None if zero is None else zero.repeat_interleave(group // sub, dim=-1)
        group = sub
    u = w.u.to(torch.int16)
    gathered = u.index_select(-1, k_index.clamp_min(0))  # [.., N, P * G]; zero slots get any value (x is 0 there)
    q = (gathered - mid).to(torch.int8)
    if not prefix:
        q = torch.where(k_index >= 0, q, torch.zeros_like(q))
    layer.qweight = layer.ops.pack_groups(q, scale, zero, group)
    layer.k_in, layer.k_slots = len(w.g_idx), len(k_index)
    # buffers, so that model.to(device) moves them: the slot order, and the column of x each slot reads (K: zero)
    layer.register_buffer("k_index", None if prefix else k_index, persistent=False)
    gather = None if prefix else torch.where(k_index >= 0, k_index, len(w.g_idx))
    layer.register_buffer("k_gather", gather, persistent=False)


def gather_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [T, P * G] in the packed weight's slot order, zeros in the zero slots."""
    if _input_as_is(layer):
        return x
    if layer.k_index is None:
        return F.pad(x, (0, layer.k_slots - layer.k_in))
    return F.pad(x, (0, 1)).index_select(-1, layer.k_gather)  # column K is the zero slot


def _input_as_is(layer: nn.Module) -> bool:
    """The packed weight's slots are x's columns in order (no permutation, no padding): gather_input is x."""
    return layer.k_index is None and layer.k_slots == layer.k_in


def unpacked_weight(layer: nn.Module) -> torch.Tensor:
    """The effective weight float32 [.., N, K] in the checkpoint's row order, from what the kernel holds."""
    w = layer.ops.group_dequantize(layer.qweight)  # [.., N, P * G]
    if layer.k_index is None:
        return w[..., : layer.k_in]
    out = w.new_zeros(*w.shape[:-1], layer.k_in)
    valid = layer.k_index >= 0
    out[..., layer.k_index[valid]] = w[..., valid]
    return out


# ---- the methods a format derives from: it declares its tensors and unpacks them ---------------------------------
class UnpackingLinearMethod(LinearMethod):
    """A format's integer weight-only linear: `tensors` declares the checkpoint's, `unpack` turns the loaded ones (a
    leading expert axis allowed) into Unpacked; packing, the kernel call and the reference are shared."""

    @abstractmethod
    def unpack(self, layer: nn.Module, spec: LinearSpec) -> Unpacked:
        """The loaded checkpoint tensors of `layer` (consumed: deleted from it) as Unpacked."""

    def after_load(self, layer: nn.Module, spec: LinearSpec) -> None:
        pack(layer, self.unpack(layer, spec))

    def apply(self, layer: nn.Module, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        y = layer.ops.group_matmul(gather_input(layer, x), layer.qweight)  # [T, N]
        return y if layer.bias is None else y + layer.bias.to(y.dtype)

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        return unpacked_weight(layer)

    def group_weight(self, layer: nn.Module):
        return layer.qweight if _input_as_is(layer) else None


class UnpackingMoEMethod(MoEMethod):
    """Stacked experts of one scheme: per-expert checkpoint tensors stacked [E_local, ...] by the default load and
    unpacked by the format's linear method; one GroupWeight [E, N, K] for the grouped kernel where the experts share
    their row order (no act order), else a GroupWeight per expert, looped."""

    def __init__(self, expert_method: UnpackingLinearMethod):
        self.expert_method = expert_method

    def after_load(self, layer: nn.Module, spec: MoESpec) -> None:
        w = self.expert_method.unpack(layer, spec.expert_linear(spec.expert_shard.start))
        if w.g_idx.dim() == 2 and bool((w.g_idx == w.g_idx[:1]).all()):
            w.g_idx = w.g_idx[0]  # the experts share one row order
        if w.g_idx.dim() == 1:
            pack(layer, w)
            layer.per_expert = None
            return
        experts = nn.ModuleList()
        for e in range(w.u.shape[0]):
            m = nn.Module()
            m.ops = layer.ops
            zero = None if w.zero is None else w.zero[e]
            pack(m, Unpacked(w.u[e], w.scale[e], zero, w.g_idx[e], w.bits, w.group))
            experts.append(m)
        layer.per_expert = experts

    def apply(self, layer, x, group_counts, ops, is_prefill):
        if layer.per_expert is None:
            y = ops.grouped_group_matmul(gather_input(layer, x), layer.qweight, group_counts)
        else:
            y = x.new_zeros(x.shape[0], layer.spec.local_shape[1])  # [M, N]
            start = 0
            for e, count in enumerate(group_counts.tolist()):
                if count:
                    m, rows = layer.per_expert[e], slice(start, start + count)
                    y[rows] = ops.group_matmul(gather_input(m, x[rows]), m.qweight)
                start += count
        return y if layer.bias is None else y + expert_rows(layer.bias.to(y.dtype), group_counts, y.shape[0])

    def reference_weight(self, layer: nn.Module) -> torch.Tensor:
        if layer.per_expert is None:
            return unpacked_weight(layer)
        return torch.stack([unpacked_weight(m) for m in layer.per_expert])
