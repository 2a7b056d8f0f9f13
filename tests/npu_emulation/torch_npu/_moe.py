"""EMULATION (plain torch, CPU) of torch_npu's MoE routing and grouped matmul, from the docs' equivalent CPU code."""

from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1


def npu_moe_init_routing_v2(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    active_num: int = -1,
    expert_capacity: int = -1,
    expert_num: int = -1,
    drop_pad_mode: int = 0,
    expert_tokens_num_type: int = 0,
    expert_tokens_num_flag: bool = False,
    quant_mode: int = -1,
    active_expert_range: list[int] | tuple[int, ...] = (),
    row_idx_type: int = 0,
    x_dtype: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """doc npu_moe_init_routing_v2 (its MoeInitRoutingV2CPU.cpu_op_exec), dropless and unquantized only.

    expert_idx [NUM_ROWS, K] int32 is flattened row-major (source row r = t*K + j) and stably sorted by expert.
    row_idx_type 0: expanded_row_idx[r] = position of r in the sorted order (-1 if its expert is out of range);
    1: expanded_row_idx[i] = r of sorted position i. expanded_x[i] = x[sorted_r[i] // K]. expert_tokens per expert
    of active_expert_range: counts (type 1) or their cumsum (type 0), int64. Returns
    (expanded_x, expanded_row_idx int32, expert_tokens, expanded_scale (empty: no quantization)).
    """
    if drop_pad_mode != 0 or quant_mode != -1 or scale is not None or offset is not None or x_dtype is not None:
        raise NotImplementedError("emulated npu_moe_init_routing_v2: only dropless (drop_pad_mode 0), quant_mode -1")
    if x.dim() != 2 or expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [NUM_ROWS, H] and expert_idx [NUM_ROWS, K]; got {tuple(x.shape)}, {tuple(expert_idx.shape)}")
    if expert_idx.dtype != torch.int32:
        raise TypeError(f"expert_idx must be int32, got {expert_idx.dtype}")
    start, end = (list(active_expert_range) or [0, expert_num])[:2]
    if end <= start:
        raise ValueError("give expert_num or active_expert_range=[start, end)")
    K = expert_idx.shape[1]
    flat = expert_idx.reshape(-1).long()
    in_range = int(((flat >= start) & (flat < end)).sum())
    keys = torch.where(flat < start, torch.full_like(flat, INT32_MAX), flat)
    order = torch.sort(keys, stable=True).indices  # sorted position -> source row r
    if row_idx_type == 1:
        expanded_row_idx = order.to(torch.int32)
    else:
        expanded_row_idx = torch.full_like(flat, -1)
        expanded_row_idx[order[:in_range]] = torch.arange(in_range)
        expanded_row_idx = expanded_row_idx.to(torch.int32)
    counts = torch.bincount(keys[order[:in_range]] - start, minlength=end - start)
    if not expert_tokens_num_flag:
        expert_tokens = torch.empty(0, dtype=torch.int64)
    elif expert_tokens_num_type in (0, 1):
        expert_tokens = (counts.cumsum(0) if expert_tokens_num_type == 0 else counts).to(torch.int64)
    else:
        raise NotImplementedError("emulated npu_moe_init_routing_v2: expert_tokens_num_type 2 (key-value pairs)")
    active = in_range if active_num in (0, -1) else min(active_num, in_range)
    expanded_x = x[order[:active] // K]
    return expanded_x, expanded_row_idx, expert_tokens, torch.empty(0, dtype=torch.float32)


def npu_grouped_matmul(
    x: list[torch.Tensor],
    weight: list[torch.Tensor],
    *,
    bias=None,
    scale=None,
    offset=None,
    antiquant_scale=None,
    antiquant_offset=None,
    per_token_scale=None,
    group_list: torch.Tensor | None = None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item: int = 0,
    group_type: int | None = None,
    group_list_type: int = 0,
    act_type: int = 0,
    tuning_config=None,
    output_dtype: torch.dtype | None = None,
    x_dtype=None,
    weight_dtype=None,
    scale_dtype=None,
    per_token_scale_dtype=None,
) -> list[torch.Tensor]:
    """doc npu_grouped_matmul, the "single-single-single" case: group_type 0 (M axis), split_item 2/3,
    x [x2d [M, K]], weight [w [E, K, N]] (a transposed view is allowed), group_list Tensor int64 [E]:
    cumulative ends (group_list_type 0) or counts (1). y_e = x[rows of group e] @ w[e]; the A8W8 quant case
    (x and weight int8, scale [s [E, N]] float32 or bfloat16, optional per_token_scale [p [M]] float32, output_dtype
    bfloat16 or float16): y_e = (x_e @ w[e], int32 sums) * s[e] * p[rows of e].

    The doc asks that the groups cover x exactly; vllm-ascend runs it with fewer grouped rows than M (expert
    parallelism) and reports garbage in the rows past the last group ("npu_grouped_matmul output random values
    at [num_valid_tokens:, ...]", ops/fused_moe). The emulation allows that and fills those rows with NaN, so a
    caller that forgets to mask them fails loudly."""
    quant = (bias, offset, antiquant_scale, antiquant_offset, activation_input,
             activation_quant_scale, activation_quant_offset, x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)
    if any(v is not None for v in quant) or act_type != 0:
        raise NotImplementedError("emulated npu_grouped_matmul: only the A8W8 per-channel quant case is modelled")
    a8w8 = scale is not None
    if a8w8:
        _check_a8w8(x, weight, scale, per_token_scale, output_dtype)
    elif per_token_scale is not None:
        raise ValueError("per_token_scale without scale")
    if len(x) != 1 or len(weight) != 1 or group_type != 0 or split_item not in (2, 3):
        raise NotImplementedError("emulated npu_grouped_matmul: only one x, one 3-D weight, group_type 0, split_item 2/3")
    xs, w = x[0], weight[0]
    if xs.dim() != 2 or w.dim() != 3 or w.shape[1] != xs.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [E, K, N]; got {tuple(xs.shape)}, {tuple(w.shape)}")
    if not isinstance(group_list, torch.Tensor) or group_list.dtype != torch.int64 or group_list.shape != (w.shape[0],):
        raise ValueError(f"group_list must be an int64 tensor [E={w.shape[0]}]")
    if group_list_type == 0:
        ends = group_list
    elif group_list_type == 1:
        ends = group_list.cumsum(0)
    else:
        raise NotImplementedError("emulated npu_grouped_matmul: group_list_type 2 not modelled")
    if bool((group_list < 0).any()) or bool((ends[1:] < ends[:-1]).any()) or int(ends[-1]) > xs.shape[0]:
        raise ValueError(f"group_list (type {group_list_type}) does not fit x's {xs.shape[0]} rows: {group_list.tolist()}")
    y = torch.full((xs.shape[0], w.shape[2]), float("nan"), dtype=output_dtype or xs.dtype)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if a8w8:
            acc = xs[start:end].to(torch.int32) @ w[e].to(torch.int32)  # [rows, N] int32
            part = acc.float() * scale[0][e].float()
            if per_token_scale is not None:
                part = part * per_token_scale[0][start:end].unsqueeze(-1)
            y[start:end] = part.to(y.dtype)
        else:
            y[start:end] = (xs[start:end].float() @ w[e].float()).to(y.dtype)
        start = end
    return [y]


def _check_a8w8(x, weight, scale, per_token_scale, output_dtype) -> None:
    if x[0].dtype != torch.int8 or weight[0].dtype != torch.int8:
        raise TypeError(f"A8W8 npu_grouped_matmul: x and weight int8, got {x[0].dtype}, {weight[0].dtype}")
    if output_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"A8W8 npu_grouped_matmul: output_dtype bfloat16 or float16, got {output_dtype}")
    E, _, N = weight[0].shape
    s = scale[0]
    if s.shape != (E, N) or s.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"A8W8 scale must be float32/bfloat16 [E={E}, N={N}], got {s.dtype} {tuple(s.shape)}")
    if per_token_scale is not None:
        p = per_token_scale[0]
        if p.dtype != torch.float32 or p.shape != (x[0].shape[0],):
            raise ValueError(f"per_token_scale must be float32 [M={x[0].shape[0]}], got {p.dtype} {tuple(p.shape)}")


def npu_moe_finalize_routing(
    expanded_permuted_rows: torch.Tensor,
    skip1: torch.Tensor | None,
    skip2: torch.Tensor | None,
    bias: torch.Tensor | None,
    scales: torch.Tensor | None,
    expanded_src_to_dst_row: torch.Tensor,
    export_for_source_row: torch.Tensor | None,
    drop_pad_mode: int = 0,
    k: int = 1,
) -> torch.Tensor:
    """doc npu_moe_finalize_routing (its moe_finalize_routing_np), dropless: out[i] = skip1[i] + skip2[i] +
    sum_j scales[i, j] * (rows[dst(i, j)] + bias[expert(i, j)]), rows of dst = -1 counting as 0. The index is read
    column-wise, dst(i, j) = src_to_dst[j * NUM_ROWS + i], for drop_pad_mode 0, and row-wise, src_to_dst[i * K + j],
    for drop_pad_mode 2."""
    if drop_pad_mode not in (0, 2):
        raise NotImplementedError(f"emulated npu_moe_finalize_routing: drop_pad_mode {drop_pad_mode} (drop modes)")
    if skip1 is None and skip2 is not None:
        raise ValueError("skip2 must be None when skip1 is None")
    dtype = expanded_permuted_rows.dtype
    for name, t in (("skip1", skip1), ("skip2", skip2), ("bias", bias), ("scales", scales)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal expanded_permuted_rows dtype {dtype}")
    if expanded_src_to_dst_row.dtype != torch.int32 or expanded_src_to_dst_row.dim() != 1:
        raise TypeError("expanded_src_to_dst_row must be a 1-D int32 tensor")
    K = scales.shape[1] if scales is not None else k
    rows = expanded_src_to_dst_row.shape[0] // K
    idx = expanded_src_to_dst_row.long()
    idx = idx.view(K, rows).t() if drop_pad_mode == 0 else idx.view(rows, K)  # [NUM_ROWS, K]
    picked = expanded_permuted_rows.float()[idx.clamp_min(0)] * (idx >= 0).unsqueeze(-1)  # [NUM_ROWS, K, H]
    if bias is not None:
        if export_for_source_row is None:
            raise ValueError("bias needs export_for_source_row (the expert of each (row, k))")
        picked = picked + bias.float()[export_for_source_row.long()]
    if scales is not None:
        picked = picked * scales.float().unsqueeze(-1)
    out = picked.sum(dim=1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(dtype)
