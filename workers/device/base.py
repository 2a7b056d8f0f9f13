"""The device op table: what layers ask a device for. Plain-torch implementations here serve CPU and CUDA
and are the numerical reference the NPU table is checked against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """One step's batch layout, built once by the model runner and read by every attention layer.

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


class TorchOps:
    """Device-neutral torch ops (CPU, CUDA)."""

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
    ) -> torch.Tensor:
        """q [T, H, D] over each sequence's cached keys (GQA) -> [T, H, D]; one batched SDPA call."""
        T, H, D = q.shape
        B = meta.query_lens.shape[0]
        qp = q.new_zeros(B * meta.max_q, H, D).index_copy_(0, meta.pad_index, q)
        qp = qp.view(B, meta.max_q, H, D).transpose(1, 2)  # [B, H, Mq, D]
        k = _gather(k_cache, meta)  # [B, Hkv, Mk, D]
        v = _gather(v_cache, meta)
        out = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=meta.attn_mask, scale=scale, enable_gqa=k.shape[1] != H
        )  # [B, H, Mq, D]
        out = out.transpose(1, 2).reshape(B * meta.max_q, H, D)
        return out.index_select(0, meta.pad_index)


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
