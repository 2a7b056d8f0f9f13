"""The device op table: what layers ask a device for. Plain-torch implementations here serve CPU and CUDA
and are the numerical reference the NPU table is checked against."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shardserve.workers.device.quant_ops import QuantOps


@dataclass
class AttentionMetadata:
    """One step's batch layout, built once by the model runner and read by every attention layer (and, through
    `is_prefill`, by every linear layer's quant method).

    Tokens of all sequences are flattened to T rows; sequence b owns rows query_start[b]:query_start[b+1].
    """

    slot_mapping: torch.Tensor  # [T] flat KV slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    query_lens: torch.Tensor  # [B] new tokens per sequence
    context_lens: torch.Tensor  # [B] tokens in the cache after this step (prefix + new)
    pad_index: torch.Tensor  # [T] row of each token in the padded [B * max_q] layout
    attn_mask: torch.Tensor  # [B, 1, max_q, max_k] bool: causal within the sequence's context
    max_q: int
    max_k: int
    # some sequence feeds more than one token (max_q > 1): schemes such as ModelSlim W8A8_MIX quantize
    # activations per token while prefilling and with static scales while decoding
    is_prefill: bool
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def window_mask(self, window: int) -> torch.Tensor:
        """attn_mask limited to the last `window` keys of each query (itself included): a query at position p sees
        keys p - window < j <= p, transformers' sliding_window_overlay and llama.cpp's LLAMA_SWA_TYPE_STANDARD.
        Built once per step and window, on the mask's device."""
        if window not in self._window_masks:
            dev = self.attn_mask.device
            i = torch.arange(self.max_q, device=dev).view(1, -1, 1)
            j = torch.arange(self.max_k, device=dev).view(1, 1, -1)
            first = (self.context_lens - self.query_lens).view(-1, 1, 1)  # [B, 1, 1] position of the first query
            mask = self.attn_mask & (j > first + i - window).unsqueeze(1)  # [B, 1, max_q, max_k]
            empty = ~mask.any(-1, keepdim=True)  # padding rows: keep them one key, as attn_mask does
            self._window_masks[window] = mask | (empty & (j == 0).unsqueeze(1))
        return self._window_masks[window]


@dataclass
class DecodeLayerSpec:
    """A llama-family decoder layer as a table's fused decode path sees it (the model describes it: llama.py's
    DecoderLayer.decode_spec): this rank's sizes and the tensors its torch forward reads. The path computes what
    the layer's forward computes for one new token per sequence: RMSNorm (residual add), q/k/v product (+ bias),
    optional per-head q/k RMSNorm, rotary, KV cache write, attention, o product; RMSNorm (residual add), gate/up
    product, silu(gate) * up, down product. Every norm takes `eps`. Without gate_up and down (an MoE layer) the
    path runs the attention only and the layer's module does its post-attention norm and MLP."""

    hidden: int
    heads: int  # this rank's query heads
    kv_heads: int
    head_dim: int
    inter: int  # this rank's intermediate size
    eps: float
    scale: float
    window: int | None
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor | None  # None with gate_up
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None
    qkv_bias: torch.Tensor | None  # [(heads + 2 kv_heads) head_dim]
    qkv: object  # the weights, each as its linear method holds it (a GroupWeight where kept quantized)
    o: object
    gate_up: object | None
    down: object | None


class TorchOps(QuantOps):
    """Device-neutral torch ops (CPU, CUDA), the quantized matmuls (quant_ops.py) included."""

    def fused_decoder(self, specs: list[DecodeLayerSpec]):
        """A path that runs these layers' decode steps in fewer calls than their modules (cpu_decode.FusedDecoder),
        or None where this table has none or it does not take these weights: the modules' forward then runs."""
        return None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * weight.float()).to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NeoX/HF rotate-half rotary. q [T, H, D], k [T, Hkv, D], cos/sin [T, R/2] with R <= D rotated dims."""
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """k, v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots [T]."""
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """q [T, H, D] over each sequence's cached keys (GQA) -> [T, H, D]; one batched SDPA call. `window`: each
        query sees only its last `window` keys (sliding-window attention, AttentionMetadata.window_mask)."""
        T, H, D = q.shape
        B = meta.query_lens.shape[0]
        qp = q.new_zeros(B * meta.max_q, H, D).index_copy_(0, meta.pad_index, q)
        qp = qp.view(B, meta.max_q, H, D).transpose(1, 2)  # [B, H, Mq, D]
        k = _gather(k_cache, meta)  # [B, Hkv, Mk, D]
        v = _gather(v_cache, meta)
        out = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=meta.attn_mask if window is None else meta.window_mask(window), scale=scale,
            enable_gqa=k.shape[1] != H,
        )  # [B, H, Mq, D]
        out = out.transpose(1, 2).reshape(B * meta.max_q, H, D)
        return out.index_select(0, meta.pad_index)

    # ---- MoE: the semantics of torch_npu npu_moe_init_routing_v2 / npu_grouped_matmul / npu_moe_finalize_routing
    def moe_init_routing(
        self, x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expand each token once per chosen expert and sort the rows by expert (stable: token order kept).

        x [T, H], topk_ids [T, k] in [0, num_experts) -> expanded_x [T*k, H] sorted by expert,
        expanded_row_idx [T*k] (flat row t*k+j -> its position in the sorted order), expert_tokens [E] counts.
        """
        T, k = topk_ids.shape
        flat = topk_ids.reshape(-1)  # [T*k] expert of row t*k+j
        order = torch.argsort(flat, stable=True)  # [T*k] sorted position -> flat row
        positions = torch.arange(T * k, device=x.device)
        expanded_row_idx = torch.empty_like(order).scatter_(0, order, positions)  # [T*k] flat row -> position
        expanded_x = x.index_select(0, order // k)  # [T*k, H]
        # counted by scatter_add, not bincount: bincount sizes its output from the values (a host sync on
        # CUDA/NPU, no meta kernel); ids are in [0, num_experts) here
        expert_tokens = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )  # [E]
        return expanded_x, expanded_row_idx, expert_tokens

    def grouped_matmul(self, x: torch.Tensor, w: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
        """Rows of group g times w[g]: x [M, K] sorted by group, w [E, N, K], group_counts [E] -> [M, N].

        One grouped GEMM (torch's grouped_mm) reading w as [E, K, N]: fastest when w is a transposed view
        of contiguous [E, K, N] storage (the MoE methods' after_load lays it out so). Rows past
        sum(group_counts) are left unspecified (as npu_grouped_matmul leaves them): callers mask them.
        """
        offs = group_counts.cumsum(0).to(torch.int32)  # [E] end row of each group
        return F.grouped_mm(x.contiguous(), w.transpose(1, 2), offs=offs)  # [M, K] x [E, K, N] -> [M, N]

    def moe_finalize_routing(
        self,
        y: torch.Tensor,
        topk_weights: torch.Tensor,
        expanded_row_idx: torch.Tensor,
        shared: torch.Tensor | None,
    ) -> torch.Tensor:
        """Un-sort and combine: out[t] = sum_j topk_weights[t, j] * y[expanded_row_idx[t*k+j]] + shared[t].

        y [T*k, H] sorted by expert, topk_weights [T, k], expanded_row_idx [T*k], shared [T, H] or None
        -> [T, H].
        """
        T, k = topk_weights.shape
        rows = y.index_select(0, expanded_row_idx).view(T, k, -1)  # [T, k, H] in token order
        weights = topk_weights.to(y.dtype).unsqueeze(1)  # [T, 1, k]
        out = torch.bmm(weights, rows).squeeze(1)  # [T, 1, k] @ [T, k, H] -> [T, H]
        return out if shared is None else out + shared

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """[.., 2I] -> [.., I]: silu(gate) * up, gate the first half."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _gather(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    blocks = cache[meta.block_tables]  # [B, max_blocks, block_size, Hkv, D]
    B, nb, bs, Hkv, D = blocks.shape
    return blocks.view(B, nb * bs, Hkv, D)[:, : meta.max_k].transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    R = cos.shape[-1] * 2
    rot, rest = x[..., :R], x[..., R:]
    x1, x2 = rot.float().chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, R/2]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


@dataclass
class DeviceBackend:
    """A device: its torch device, collectives backend, Ray resource name and op table."""

    name: str  # cpu | cuda | npu
    dist_backend: str  # gloo | nccl | hccl
    ray_resource: str  # CPU | GPU | NPU
    ops: TorchOps

    def device(self) -> torch.device:
        return torch.device(self.name)

    def setup(self, local_index: int) -> torch.device:
        """Bind this process to its device (Ray already set the visible-devices variable)."""
        return self.device()

    def default_dtype(self) -> torch.dtype:
        return torch.float32 if self.name == "cpu" else torch.bfloat16

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zero-filled tensor on `device` (the KV cache's). On the host: `host_zeros`."""
        if device.type == "cpu":
            return host_zeros(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=device)

    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) bytes of the device memory, None where the KV budget is set in GB (CPU)."""
        return None

    def kv_cache_budget(self, mem_fraction_static: float, cpu_gb: float) -> int:
        """Bytes this rank may give its KV cache: SGLang's rule on accelerators (the static share of total
        memory, less what the weights and runtime already hold), a fixed size on CPU."""
        info = self.memory_info()
        if info is None:
            return int(cpu_gb * 2**30)
        free, total = info
        budget = int(total * mem_fraction_static) - (total - free)
        if budget <= 0:
            raise RuntimeError(
                f"{self.name}: the weights leave no KV cache room under --mem-fraction-static "
                f"{mem_fraction_static} ({(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use); raise it"
            )
        return budget


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero host tensor over pages of its own anonymous mapping: page-aligned, zeroed by the kernel as each page
    is first touched, unmapped when the tensor goes. torch.zeros writes every byte up front: the CPU KV cache's
    default 1 GiB took 1.9 s of the default model's ready time on 2 cores, where this takes milliseconds and the
    cost of a page moves to the step that first writes a token there, once per page: SmolLM2 at batch 1 takes 11
    first-touch faults a step (~1.3 us each here: 15 us of a 6 ms step) until its blocks have all been written."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)  # the tensor holds the mapping
