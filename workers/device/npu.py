"""The Ascend NPU backend: torch_npu ops, HCCL collectives, Ray's "NPU" resource.

This is the only module of shardserve that imports `torch_npu`, and only inside functions, so that
`available()` answers False cleanly where it is not installed.

What is verified and what is not: every torch_npu call below was written against the op's published signature
(op-plugin's `op_plugin/config/op_plugin_functions.yaml` and its `docs/zh/custom_APIs/torch_npu/*.md`, Ascend/op-plugin
@517f2e7d) and, where vllm-ascend calls the same op, against that call (vllm-project/vllm-ascend @182b75ea). Without
Ascend hardware, the tests run this file against `tests/npu_emulation/torch_npu`, a plain-torch emulation of each
op's DOCUMENTED semantics. Those tests prove our plumbing (argument names, layouts, index conventions, dtypes of
index tensors) against our reading of the docs; they do not prove Ascend's kernels, their numerics, their
performance, or hardware limits that the emulation does not model (e.g. fp32 inputs to fused attention).
"""

from __future__ import annotations

import os

import torch

from shardserve.workers.device.base import AttentionMetadata, DeviceBackend, TorchOps
from shardserve.workers.device.quant_ops import GroupWeight, WeightKind, affine_to_offset

VISIBLE_DEVICES = "ASCEND_RT_VISIBLE_DEVICES"
MASK_SIZE = 2048  # fused attention's compressed causal mask for sparse_mode 2/3/4 is always 2048 x 2048


def available() -> bool:
    """torch_npu importable and at least one NPU visible."""
    try:
        _torch_npu()
    except ImportError:
        return False
    return torch.npu.is_available()


def backend() -> NpuBackend:
    npu = _torch_npu()
    # Under the test emulation of torch_npu (tests/npu_emulation) tensors stay on CPU, where HCCL cannot run: only
    # there do the ranks talk through gloo. Real torch_npu has no EMULATED attribute.
    dist_backend = "gloo" if _emulated(npu) else "hccl"
    return NpuBackend(name="npu", dist_backend=dist_backend, ray_resource="NPU", ops=NpuOps(npu))


class NpuBackend(DeviceBackend):
    def setup(self, local_index: int) -> torch.device:
        """Ray gives an actor holding {"NPU": 1} exactly one visible device, so it is always index 0 there."""
        _torch_npu()
        torch.npu.set_device(local_index)
        return self.device()

    def device(self) -> torch.device:
        if _emulated(_torch_npu()):  # the emulation keeps tensors on CPU (see backend())
            return torch.device("cpu")
        return torch.device("npu", torch.npu.current_device())

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of this process's NPU."""
        return torch.npu.mem_get_info()

    def set_memory_fraction(self, fraction: float) -> None:
        """Cap this process's share of NPU memory (--mem-fraction-static)."""
        torch.npu.set_per_process_memory_fraction(fraction)


def _torch_npu():
    """Import torch_npu after making sure the actor only sees the NPUs Ray gave it."""
    _bind_ray_npus()
    import torch_npu

    return torch_npu


def _bind_ray_npus() -> None:
    """Ray exports ASCEND_RT_VISIBLE_DEVICES for an actor holding NPUs; where it did not (e.g. with
    RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES), set it from the actor's assigned ids, before torch_npu
    initialises the device runtime (the runtime reads it once, at device init)."""
    if VISIBLE_DEVICES in os.environ:
        return
    import ray

    if not ray.is_initialized():
        return
    ids = ray.get_runtime_context().get_accelerator_ids().get("NPU", [])
    if ids:
        os.environ[VISIBLE_DEVICES] = ",".join(str(i) for i in ids)


def _emulated(npu) -> bool:
    return bool(getattr(npu, "EMULATED", False))


class NpuOps(TorchOps):
    """The op table on torch_npu kernels. Each call names the source its signature was taken from:
    [yaml] = op_plugin_functions.yaml, [doc] = docs/zh/custom_APIs/torch_npu/torch_npu-<op>.md, both Ascend/op-plugin;
    [vllm-ascend path] = the same call in vllm-ascend."""

    def __init__(self, npu):
        self.npu = npu
        self._step: tuple[AttentionMetadata, list[int], list[int], torch.Tensor] | None = None
        self._mask: torch.Tensor | None = None

    # --- norms, rotary, activation -----------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # [yaml] npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (y, rstd)
        return self.npu.npu_rms_norm(x, weight, epsilon=eps)[0]

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [yaml][doc] npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06) -> (y, rstd, x = x1 + x2)
        y, _, summed = self.npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)
        return y, summed

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D], cos/sin [T, R/2] (rotate-half over the first R dims)."""
        R, D = cos.shape[-1] * 2, q.shape[-1]
        cos_t = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype)  # [T, 1, R]: the ops take full-width tables
        sin_t = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype)
        if R == D and D in (64, 128):
            # [doc apply_rotary_pos_emb] npu_apply_rotary_pos_emb(query, key, cos, sin, *, layout='BSND',
            # rotary_mode='half'): q/k/cos/sin of one dtype, TND = [T, N, D] with cos [T, 1, D], D in {64, 128}
            # on A2/A3; updates query and key in place (contiguous copies here). vllm-ascend _310p/ops/rotary_embedding.py
            return self.npu.npu_apply_rotary_pos_emb(
                q.contiguous(), k.contiguous(), cos_t, sin_t, layout="TND", rotary_mode="half"
            )
        # partial rotary or other D: [doc rotary_mul] npu_rotary_mul(input, r1, r2, rotary_mode='half') on the
        # rotated slice, input TND [T, N, R] with r1/r2 T1D [T, 1, R]
        q_rot = self.npu.npu_rotary_mul(q[..., :R].contiguous(), cos_t, sin_t, rotary_mode="half")
        k_rot = self.npu.npu_rotary_mul(k[..., :R].contiguous(), cos_t, sin_t, rotary_mode="half")
        return torch.cat((q_rot, q[..., R:]), dim=-1), torch.cat((k_rot, k[..., R:]), dim=-1)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
        # [yaml] npu_swiglu(Tensor self, int dim=-1): swish(first half) * second half
        return self.npu.npu_swiglu(x, dim=-1)

    # --- paged KV cache and attention -----------------------------------------------------------------------
    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
    ) -> None:
        # [yaml][doc] npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, ...,
        # cache_mode='PA_NZ'); "Norm" = ND caches [num_blocks, block_size, Hkv, D]; inputs must be contiguous.
        # vllm-ascend device/device_op.py BaseDeviceAdaptor.reshape_and_cache (A2/A3).
        self.npu.npu_scatter_pa_kv_cache(
            key=k.contiguous(), value=v.contiguous(), key_cache=k_cache, value_cache=v_cache,
            slot_mapping=slots.contiguous(), cache_mode="Norm",
        )

    def paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """q [T, H, D] (sequences back to back) over the paged cache -> [T, H, D]; `window`: each query sees its
        last `window` keys only."""
        T, H, D = q.shape
        num_blocks, block_size, Hkv, _ = k_cache.shape
        q_ends, kv_lens, block_table = self._step_lengths(meta)
        # [yaml][doc] npu_fused_infer_attention_score, TND layout with PageAttention, as vllm-ascend
        # attention/attention_v1.py forward_fused_infer_attention calls it: actual_seq_lengths = cumulative query
        # ends, actual_seq_lengths_kv = per-sequence context lengths, key/value = caches viewed [blocks, bs, Hkv*D],
        # block_table int32 [B, max_blocks], sparse_mode 3 (right-down causal) with the 2048 x 2048 upper-triangle
        # int8 mask (vllm-ascend attention/attention_mask.py get_splitfuse_attn_mask).
        # A sliding window is [doc] sparse_mode 4 ("band", the same compressed mask) with pre_tokens / next_tokens
        # counted from the right-down diagonal: query i sees keys i' - pre_tokens .. i' + next_tokens, i' its
        # position. HF's window W is the query and the W - 1 keys before it, hence pre_tokens = W - 1. vllm-ascend
        # passes its window unchanged (attention_v1.py, its sinks path); which count the kernel means, and whether
        # it honours pre_tokens at Q_S 1 (the doc says it ignores it there), is checked against our emulation only.
        band = {} if window is None else {"sparse_mode": 4, "pre_tokens": window - 1, "next_tokens": 0}
        out, _ = self.npu.npu_fused_infer_attention_score(
            q.contiguous(),
            k_cache.view(num_blocks, block_size, Hkv * D),
            v_cache.view(num_blocks, block_size, Hkv * D),
            atten_mask=self._causal_mask(q.device),
            block_table=block_table,
            input_layout="TND",
            block_size=block_size,
            actual_seq_lengths=q_ends,
            actual_seq_lengths_kv=kv_lens,
            num_heads=H,
            num_key_value_heads=Hkv,
            scale=scale,
            **({"sparse_mode": 3} | band),
        )
        return out.view(T, H, D)

    def _step_lengths(self, meta: AttentionMetadata) -> tuple[list[int], list[int], torch.Tensor]:
        """Host-side lengths and an int32 block table, once per step (meta) rather than once per layer."""
        if self._step is None or self._step[0] is not meta:
            q_ends = torch.cumsum(meta.query_lens, dim=0).tolist()
            self._step = (meta, q_ends, meta.context_lens.tolist(), meta.block_tables.to(torch.int32))
        return self._step[1], self._step[2], self._step[3]

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if self._mask is None or self._mask.device != device:
            ones = torch.ones(MASK_SIZE, MASK_SIZE, device=device)
            self._mask = torch.triu(ones, diagonal=1).to(torch.int8)  # 1 = masked
        return self._mask

    # --- MoE ------------------------------------------------------------------------------------------------
    def moe_init_routing(
        self, x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H], topk_ids [T, k] -> (expanded_x [T*k, H] sorted by expert (stable), expanded_row_idx [T*k] int32
        with expanded_row_idx[t*k + j] = row of expanded_x holding (token t, choice j), expert_tokens [E] int64)."""
        T, k = topk_ids.shape
        # [yaml][doc] npu_moe_init_routing_v2(x, expert_idx, *, ..., active_num=-1, expert_capacity=-1, expert_num=-1,
        # drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False, quant_mode=-1,
        # active_expert_range=[], row_idx_type=0) -> (expanded_x, expanded_row_idx, expert_tokens, expanded_scale).
        # expert_tokens_num_type 1 = per-expert counts; row_idx_type 0 = index by source (t*k + j). Same arguments
        # as vllm-ascend ops/fused_moe/token_dispatcher.py (all-gather dispatcher).
        expanded_x, expanded_row_idx, expert_tokens, _ = self.npu.npu_moe_init_routing_v2(
            x, topk_ids.to(torch.int32), active_num=T * k, expert_num=num_experts, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, active_expert_range=[0, num_experts], quant_mode=-1,
        )
        return expanded_x, expanded_row_idx, expert_tokens.to(torch.int64)

    def grouped_matmul(self, x: torch.Tensor, w: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
        """x [M, K] rows grouped by expert, w [E, N, K], group_counts [E] int64 (rows per expert) -> [M, N]."""
        # [yaml][doc] npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, ..., group_list, split_item=0, group_type,
        # group_list_type=0): one x, one 3-D weight [E, K, N] (a transposed view is allowed), split_item 2 = one
        # output, group_type 0 = group the M axis, group_list_type 1 = counts (0 would be cumulative ends).
        # vllm-ascend ops/fused_moe/moe_mlp.py unquant_apply_mlp.
        return self.npu.npu_grouped_matmul(
            [x], [w.transpose(1, 2)], group_list=group_counts, split_item=2, group_type=0, group_list_type=1
        )[0]

    def moe_finalize_routing(
        self,
        y: torch.Tensor,
        topk_weights: torch.Tensor,
        expanded_row_idx: torch.Tensor,
        shared: torch.Tensor | None,
    ) -> torch.Tensor:
        """y [T*k, H] expert outputs in expanded order -> [T, H] = shared + sum_j topk_weights[t, j] * y[row(t, j)]."""
        # [yaml] npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
        # export_for_source_row, drop_pad_mode=0, k=1) (the doc spells the 7th name expert_for_source_row).
        # drop_pad_mode 2 = dropless with the index laid out by row (t*k + j), which is what init_routing_v2 returns;
        # mode 0 would read it column-wise (j*T + t), the layout of the older npu_moe_init_routing. vllm-ascend
        # switched to npu_moe_token_unpermute after "accuracy issues" with this op (ops/fused_moe/moe_comm_method.py);
        # whether those came from that layout mismatch is unverified.
        return self.npu.npu_moe_finalize_routing(
            y, skip1=shared, skip2=None, bias=None, scales=topk_weights.to(y.dtype),
            expanded_src_to_dst_row=expanded_row_idx, export_for_source_row=None, drop_pad_mode=2,
        )

    # --- quantized matmuls (contracts in quant_ops.py) -------------------------------------------------------
    def prepare_weight(self, w: torch.Tensor, kind: WeightKind) -> torch.Tensor:
        if kind == "int4":
            # [doc] npu_convert_weight_to_int4pack(weight int32 (n, k)) -> int32 (n, k/8), 8 int4 per int32; the
            # matmuls take its transpose (k/8, n). vllm-ascend quantization/methods/w4a4_laos_dynamic.py
            return self.npu.npu_convert_weight_to_int4pack(w.to(torch.int32)).transpose(-1, -2)
        # int8 / fp8: x2 as (K, N), vllm-ascend w8a8_static.py / w8a8_mxfp8.py (without their FRACTAL_NZ cast)
        return w.transpose(0, 1).contiguous()

    def prepare_mx_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """[N, Kb] -> [ceil(Kb/2), N, 2]: the kernel reads E8M0 scales in pairs along K (vllm-ascend w8a8_mxfp8.py)."""
        N, Kb = scale.shape
        pairs = torch.nn.functional.pad(scale, (0, Kb % 2)).reshape(N, -1, 2)
        return pairs.transpose(0, 1).contiguous()

    def static_quant(self, x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
        # [doc] npu_quantize(input, scales, zero_points, dtype, axis=1, div_mode=True); div_mode False:
        # input * scales + zero_points, scales/zero_points of input's dtype, size 1 broadcast along axis.
        # vllm-ascend ops/register_custom_ops.py _quantize_impl (reciprocal scale, div_mode False).
        scales = input_scale.reciprocal().to(x.dtype)
        return self.npu.npu_quantize(x, scales, input_offset.to(x.dtype), torch.qint8, -1, False)

    def dynamic_quant(self, x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        # [doc] npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None) -> (y, scale [M] f32);
        # dst_type quint4x2 gives int32 [M, K/8] (8 int4 each). vllm-ascend w8a8_dynamic.py / w4a4_laos_dynamic.py
        dst_type = {8: torch.int8, 4: torch.quint4x2}[bits]
        return self.npu.npu_dynamic_quant(x.contiguous(), dst_type=dst_type)

    def quant_matmul(
        self,
        x_q: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        pertoken_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        # [yaml][doc] npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
        # output_dtype=None, ...): (x1 @ x2 + int32 bias) * scale * pertoken_scale. Output float16/bfloat16 only;
        # int4 (int32 x1/x2) via float16 as vllm-ascend w4a4_laos_dynamic.py does. W8A8: vllm-ascend w8a8_static.py
        # (deq_scale, quant_bias), W8A8_DYNAMIC: w8a8_dynamic.py (weight_scale, pertoken_scale).
        kernel_dtype = torch.float16 if x_q.dtype == torch.int32 else _half(out_dtype)
        out = self.npu.npu_quant_matmul(
            x_q, w, scale, pertoken_scale=pertoken_scale, bias=bias, output_dtype=kernel_dtype
        )
        return out.to(out_dtype)

    def weight_quant_matmul(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> torch.Tensor:
        # [yaml][doc] npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
        # quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0): x @ ((weight + antiquant_offset)
        # * antiquant_scale). The kernel ADDS the offset, ModelSlim subtracts it: hence the negation. Per-group
        # scales are (ceil(K/g), N): a transposed view is allowed. vllm-ascend quantization/methods/w8a16.py
        antiquant_scale = scale.t() if group_size else scale.reshape(-1)
        antiquant_offset = None
        if offset is not None:
            antiquant_offset = -(offset.t() if group_size else offset.reshape(-1))
        return self.npu.npu_weight_quant_batchmatmul(
            x, w, antiquant_scale, antiquant_offset, antiquant_group_size=group_size
        )

    def grouped_dynamic_quant_matmul(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        group_counts: torch.Tensor,
        bits: int = 8,
        group: int = 0,
    ) -> torch.Tensor:
        """W8A8_DYNAMIC and W4A8 experts (int4 values in int8, per channel): npu_dynamic_quant per token, then one
        A8W8 npu_grouped_matmul. W4A4 and per-group scales run the plain-torch reference."""
        if bits != 8 or group:
            return super().grouped_dynamic_quant_matmul(x, w, scale, group_counts, bits, group)
        # [doc] npu_grouped_matmul(x=[x_q int8 [M, K]], weight=[w int8 [E, K, N]], scale=[[E, N]], per_token_scale=[[M]
        # float32], group_list, split_item=2, group_type=0, group_list_type=1 (counts), output_dtype bf16/fp16):
        # y = (x_q @ w) * scale * per_token_scale. vllm-ascend ops/fused_moe/moe_mlp.py quant_apply_mlp (w8a8 dynamic)
        x_q, pertoken = self.npu.npu_dynamic_quant(x.contiguous())
        out_dtype = _half(x.dtype)
        y = self.npu.npu_grouped_matmul(
            [x_q], [w.transpose(1, 2)], scale=[scale.to(out_dtype)], per_token_scale=[pertoken],
            group_list=group_counts, split_item=2, group_type=0, group_list_type=1, output_dtype=out_dtype,
        )[0]
        return y.to(x.dtype)

    # --- group-quantized weights (GGUF), contracts in quant_ops.py ------------------------------------------------
    def pack_groups(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, lookup: bool = False
    ) -> GroupWeight:
        """Layout "antiquant": int8 q for npu_weight_quant_batchmatmul (through weight_quant_matmul) with its
        per-group antiquant scale and offset ([doc]: group a multiple of 32 in [32, K-1]), offset = -zero / scale
        (quant_ops.affine_to_offset: one float32 division; the kernel then reads scale and offset in x's dtype,
        bf16/fp16, which rounds them). Stacked experts [E, N, K] hold each expert's (K, N) the same way
        (grouped_group_matmul). Groups of 16 (Q2_K, Q3_K, Q6_K) and lookups keep the reference layout. Checked
        against our emulation of the documented semantics, not on an Ascend device."""
        K = q.shape[-1]
        if lookup or q.dim() not in (2, 3) or group % 32 or not 32 <= group <= K - 1:
            return super().pack_groups(q, scale, zero, group, lookup)
        q, scale, offset = affine_to_offset(q, scale.float(), None if zero is None else zero.float())
        w = q.to(torch.int8).transpose(-1, -2).contiguous()  # (K, N) per expert, prepare_weight("int8")'s layout
        tensors = {"w": w, "scale": scale.contiguous()}
        if offset is not None:
            tensors["offset"] = offset.contiguous()
        return GroupWeight("antiquant", tuple(q.shape), group, **tensors)

    def group_matmul(self, x: torch.Tensor, w: GroupWeight) -> torch.Tensor:
        if w.layout != "antiquant":
            return super().group_matmul(x, w)
        offset = getattr(w, "offset", None)
        return self.weight_quant_matmul(
            x, w.w, w.scale.to(x.dtype), None if offset is None else offset.to(x.dtype), group_size=w.group
        )

    def grouped_group_matmul(self, x: torch.Tensor, w: GroupWeight, group_counts: torch.Tensor) -> torch.Tensor:
        """Stacked experts kept int8: one npu_weight_quant_batchmatmul per expert that has rows, instead of the
        reference's dequantizing every expert at each call (npu_grouped_matmul's antiquant path: the pages we read
        give no per-group scale shape, and GGUF's scales are per group). Rows past the groups stay zeros."""
        if w.layout != "antiquant":
            return super().grouped_group_matmul(x, w, group_counts)
        out = x.new_zeros(x.shape[0], w.shape[-2])  # [M, N]
        offset, start = getattr(w, "offset", None), 0
        for e, count in enumerate(group_counts.tolist()):
            if count:
                rows = slice(start, start + count)
                off = None if offset is None else offset[e].to(x.dtype)
                out[rows] = self.weight_quant_matmul(x[rows], w.w[e], w.scale[e].to(x.dtype), off, group_size=w.group)
            start += count
        return out

    def group_dequantize(self, w: GroupWeight) -> torch.Tensor:
        if w.layout != "antiquant":
            return super().group_dequantize(w)
        q = w.w.transpose(-1, -2).float()  # stored (K, N) per expert
        s = w.scale.float().repeat_interleave(w.group, dim=-1)
        offset = getattr(w, "offset", None)
        return (q if offset is None else q - offset.float().repeat_interleave(w.group, dim=-1)) * s

    def mx_quant_matmul(self, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        # Ascend 950 only. [yaml] npu_dynamic_mx_quant(input, *, axis=-1, round_mode="rint", dst_type, block_size=32,
        # scale_alg=0, ...) -> (y, mxscale [M, ceil(K/32/2), 2]) (shapes: hicann/ops-nn quant/dynamic_mx_quant/README.md);
        # then npu_quant_matmul with E8M0 scales and group_sizes [1, 1, 32], as vllm-ascend
        # quantization/methods/w8a8_mxfp8.py apply() does.
        x_q, x_scale = self.npu.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn)
        out = self.npu.npu_quant_matmul(
            x_q, w, w_scale, scale_dtype=self.npu.float8_e8m0fnu, pertoken_scale=x_scale,
            pertoken_scale_dtype=self.npu.float8_e8m0fnu, output_dtype=_half(x.dtype), group_sizes=[1, 1, 32],
        )
        return out.to(x.dtype)


def _half(dtype: torch.dtype) -> torch.dtype:
    """npu_quant_matmul writes float16 or bfloat16 (no float32): compute in bfloat16 for fp32 models."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
