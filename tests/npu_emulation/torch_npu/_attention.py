"""EMULATION (plain torch, CPU) of torch_npu's paged-KV write and fused inference attention, from their docs."""

from __future__ import annotations

import torch

MASK_SIZE = 2048
_checked_masks: set[int] = set()  # data_ptr of masks checked in full; later calls re-check a sample (saves ~4 ms)


def npu_scatter_pa_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    compress_lens: torch.Tensor | None = None,
    compress_seq_offsets: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    cache_mode: str | None = "PA_NZ",
) -> None:
    """doc npu_scatter_pa_kv_cache, scenario one with cache_mode None/"Norm" (ND caches): key/value [T, N, D] into
    caches [num_blocks, block_size, N, D] at flat slot_mapping [T], in place. Inputs must be contiguous, one dtype."""
    if cache_mode not in (None, "Norm"):
        raise NotImplementedError(f"emulated npu_scatter_pa_kv_cache: cache_mode {cache_mode!r} (FRACTAL_NZ) not modelled")
    if any(t is not None for t in (compress_lens, compress_seq_offsets, seq_lens)):
        raise NotImplementedError("emulated npu_scatter_pa_kv_cache: compression (scenario two) not modelled")
    if key.dim() != 3 or value.dim() != 3 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("key/value must be 3-D [T, N, D] and caches 4-D")
    tensors = (key, value, key_cache, value_cache, slot_mapping)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("npu_scatter_pa_kv_cache does not support non-contiguous inputs")
    if len({key.dtype, value.dtype, key_cache.dtype, value_cache.dtype}) != 1:
        raise TypeError("key, value, key_cache, value_cache must share a dtype")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    slots = slot_mapping.long()
    capacity = key_cache.shape[0] * key_cache.shape[1]
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= capacity):
        raise IndexError(f"slot_mapping must lie in [0, {capacity - 1}]")
    key_cache.view(capacity, *key_cache.shape[2:])[slots] = key
    value_cache.view(capacity, *value_cache.shape[2:])[slots] = value


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    pse_shift=None,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None,
    actual_seq_lengths_kv: list[int] | None = None,
    dequant_scale1=None,
    quant_scale1=None,
    dequant_scale2=None,
    quant_scale2=None,
    quant_offset2=None,
    antiquant_scale=None,
    antiquant_offset=None,
    key_antiquant_scale=None,
    key_antiquant_offset=None,
    value_antiquant_scale=None,
    value_antiquant_offset=None,
    block_table: torch.Tensor | None = None,
    query_padding_size=None,
    kv_padding_size=None,
    key_shared_prefix=None,
    value_shared_prefix=None,
    actual_shared_prefix_len=None,
    query_rope=None,
    key_rope=None,
    key_rope_antiquant_scale=None,
    num_heads: int = 1,
    scale: float = 1.0,
    pre_tokens: int = 2147483647,
    next_tokens: int = 2147483647,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    inner_precise: int = 0,
    block_size: int = 0,
    antiquant_mode: int = 0,
    key_antiquant_mode: int = 0,
    value_antiquant_mode: int = 0,
    softmax_lse_flag: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """yaml/doc npu_fused_infer_attention_score: softmax(scale * q k^T + mask) v -> (attention_out, softmax_lse).

    Modelled: input_layout "TND" (query [T, N, D]), GQA, sparse_mode 0 without mask (no masking), 2 (left-up causal),
    3 (right-down causal) and 4 (band: keys i' - pre_tokens .. i' + next_tokens around query i's right-down
    diagonal position i', our reading of the doc; at every query length, as vllm-ascend relies on for decode) with
    the 2048 x 2048 compressed mask, and PageAttention (block_table int32
    [B, max_blocks], key/value [num_blocks, block_size, KV_N * D]). actual_seq_lengths holds cumulative query ends.
    actual_seq_lengths_kv holds cumulative ends without block_table, and per-sequence lengths with it: the doc's
    TND section says "cumulative" for both, but vllm-ascend (run on hardware) passes per-sequence seq_lens with a
    block_table (attention_v1.py _get_fia_params), and we follow that. Everything else raises NotImplementedError.
    """
    unmodelled = {
        "pse_shift": pse_shift, "dequant_scale1": dequant_scale1, "quant_scale1": quant_scale1,
        "dequant_scale2": dequant_scale2, "quant_scale2": quant_scale2, "quant_offset2": quant_offset2,
        "antiquant_scale": antiquant_scale, "antiquant_offset": antiquant_offset,
        "key_antiquant_scale": key_antiquant_scale, "key_antiquant_offset": key_antiquant_offset,
        "value_antiquant_scale": value_antiquant_scale, "value_antiquant_offset": value_antiquant_offset,
        "query_padding_size": query_padding_size, "kv_padding_size": kv_padding_size,
        "key_shared_prefix": key_shared_prefix, "value_shared_prefix": value_shared_prefix,
        "actual_shared_prefix_len": actual_shared_prefix_len, "query_rope": query_rope, "key_rope": key_rope,
        "key_rope_antiquant_scale": key_rope_antiquant_scale,
    }
    used = sorted(name for name, v in unmodelled.items() if v is not None)
    if used or softmax_lse_flag or input_layout != "TND":
        raise NotImplementedError(
            f"emulated npu_fused_infer_attention_score models TND without {used or 'softmax_lse'}; got {input_layout}"
        )
    T, N, D = query.shape
    kv_heads = num_key_value_heads or num_heads
    if N != num_heads or num_heads % kv_heads or num_heads // kv_heads > 64:
        raise ValueError(f"query has {N} heads; num_heads={num_heads}, num_key_value_heads={num_key_value_heads}")
    q_ends = _cumulative(actual_seq_lengths, "actual_seq_lengths", T)
    B = len(q_ends)
    if block_table is None:
        kv_ends = _cumulative(actual_seq_lengths_kv, "actual_seq_lengths_kv", key.shape[0])
        if len(kv_ends) != B:
            raise ValueError("actual_seq_lengths and actual_seq_lengths_kv must have one entry per batch")
        ks = [key[a:b] for a, b in zip([0] + kv_ends[:-1], kv_ends)]
        vs = [value[a:b] for a, b in zip([0] + kv_ends[:-1], kv_ends)]
    else:
        ks, vs = _paged(key, value, block_table, block_size, actual_seq_lengths_kv, B, kv_heads, D)
    out = torch.empty_like(query)
    for b, (q0, q1) in enumerate(zip([0] + q_ends[:-1], q_ends)):
        mask = _mask_rows(sparse_mode, atten_mask, q1 - q0, ks[b].shape[0], pre_tokens, next_tokens)
        out[q0:q1] = _attend(query[q0:q1], ks[b], vs[b], scale, mask)
    return out, torch.zeros(1, dtype=torch.float32)


def _cumulative(lengths: list[int] | None, name: str, total: int) -> list[int]:
    if lengths is None:
        raise ValueError(f"TND layout requires {name}")
    ends = [int(v) for v in lengths]
    if any(v < 0 for v in ends) or any(b < a for a, b in zip(ends, ends[1:])) or ends[-1] > total:
        raise ValueError(f"{name} must be cumulative (non-decreasing, last <= {total}): {ends}")
    return ends


def _paged(key, value, block_table, block_size, kv_lens, B, kv_heads, D):
    """Gather each sequence's keys/values [L_b, KV_N, D] through its block_table row (BnBsH cache layout)."""
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be int32 [B={B}, max_blocks], got {block_table.dtype} {tuple(block_table.shape)}")
    if key.dim() != 3 or key.shape[1] != block_size or key.shape[2] != kv_heads * D:
        raise ValueError(f"paged key must be [num_blocks, block_size={block_size}, KV_N*D={kv_heads * D}]")
    if block_size <= 0 or block_size % 16 or block_size > 1024:
        raise ValueError(f"TND PageAttention needs block_size a multiple of 16, <= 1024; got {block_size}")
    if kv_lens is None or len(kv_lens) != B:
        raise ValueError("PageAttention requires actual_seq_lengths_kv, one entry per batch")
    ks, vs = [], []
    for b, n in enumerate(int(v) for v in kv_lens):
        if n > block_table.shape[1] * block_size:
            raise ValueError(f"sequence {b}: {n} keys exceed its {block_table.shape[1]} blocks")
        blocks = block_table[b, : -(-n // block_size)].long()
        ks.append(key[blocks].reshape(-1, kv_heads, D)[:n])
        vs.append(value[blocks].reshape(-1, kv_heads, D)[:n])
    return ks, vs


def _mask_rows(
    sparse_mode: int, atten_mask: torch.Tensor | None, s_q: int, s_kv: int, pre_tokens: int, next_tokens: int
) -> torch.Tensor | None:
    """Boolean [s_q, s_kv], True = attend; None = attend everything."""
    if sparse_mode == 0 and atten_mask is None:
        return None
    if sparse_mode not in (2, 3, 4):
        raise NotImplementedError(f"emulated fused attention: sparse_mode {sparse_mode} with a mask not modelled")
    if atten_mask is None or atten_mask.reshape(-1, MASK_SIZE).shape != (MASK_SIZE, MASK_SIZE):
        raise ValueError("sparse_mode 2/3/4 need the compressed 2048 x 2048 mask")
    mask = atten_mask.reshape(MASK_SIZE, MASK_SIZE)
    rows, cols = (slice(0, None, 97), slice(0, None, 89)) if mask.data_ptr() in _checked_masks else (slice(None),) * 2
    index = torch.arange(MASK_SIZE)
    expected = index[rows].unsqueeze(1) < index[cols].unsqueeze(0)  # strictly above the diagonal
    if not torch.equal(mask[rows, cols].bool(), expected):
        raise ValueError("sparse_mode 2/3/4 mask must be the upper triangle above the diagonal (1 = masked)")
    _checked_masks.add(mask.data_ptr())
    i = torch.arange(s_q).unsqueeze(1)
    j = torch.arange(s_kv).unsqueeze(0)
    shift = 0 if sparse_mode == 2 else s_kv - s_q  # 3 = right-down: the last query row sees every key
    if sparse_mode == 4:  # band around the right-down diagonal
        return (j >= i + shift - pre_tokens) & (j <= i + shift + next_tokens)
    return j <= i + shift


def _attend(q, k, v, scale, mask):
    """q [s_q, N, D], k/v [s_kv, KV_N, D] -> [s_q, N, D]; float32 softmax."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qnd,knd->nqk", q.float(), kf) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("nqk,knd->qnd", scores.softmax(dim=-1), vf).to(q.dtype)
