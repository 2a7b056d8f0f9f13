"""EMULATION (plain torch, CPU) of torch_npu's norm, rotary and activation ops, from their documented formulas."""

from __future__ import annotations

import torch


def _rms(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma covers x's trailing dims; rstd keeps the leading dims with 1s for the normalised ones."""
    if gamma.dtype != x.dtype:
        raise TypeError(f"gamma dtype {gamma.dtype} must equal x dtype {x.dtype}")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06) -> tuple[torch.Tensor, torch.Tensor]:
    """yaml: npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor): (y, rstd)."""
    return _rms(self, gamma, epsilon)


def npu_add_rms_norm(
    x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """doc npu_add_rms_norm: x = x1 + x2; returns (RMSNorm(x) * gamma, rstd float32, x)."""
    x = x1 + x2
    y, rstd = _rms(x, gamma, epsilon)
    return y, rstd, x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def npu_apply_rotary_pos_emb(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: str = "BSND",
    rotary_mode: str = "half",
) -> tuple[torch.Tensor, torch.Tensor]:
    """doc apply_rotary_pos_emb: q*cos + rotate_half(q)*sin, UPDATES query and key IN PLACE and returns them.

    A2/A3 constraints checked: layout BSND (4-D) or TND (3-D), rotary_mode "half", D in {64, 128} for q/k/cos/sin,
    one dtype for all four, cos/sin N = 1, leading dims equal.
    """
    if rotary_mode != "half":
        raise NotImplementedError(f"emulated npu_apply_rotary_pos_emb: rotary_mode {rotary_mode!r} (A2/A3: half only)")
    ndim = {"BSND": 4, "TND": 3}.get(layout)
    if ndim is None:
        raise NotImplementedError(f"emulated npu_apply_rotary_pos_emb: layout {layout!r} (A2/A3: BSND, TND)")
    tensors = (query, key, cos, sin)
    if any(t.dim() != ndim for t in tensors):
        raise ValueError(f"layout {layout} needs {ndim}-D query/key/cos/sin, got {[tuple(t.shape) for t in tensors]}")
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"query, key, cos, sin must share a dtype, got {[t.dtype for t in tensors]}")
    if any(t.shape[-1] not in (64, 128) for t in tensors) or query.shape[-1] != cos.shape[-1]:
        raise ValueError("D of query/key/cos/sin must be 64 or 128 (A2/A3) and equal")
    lead = ndim - 2  # dims before N
    if cos.shape[-2] != 1 or any(t.shape[:lead] != query.shape[:lead] for t in tensors):
        raise ValueError("cos/sin must be [.., 1, D] with the same leading dims as query and key")
    for t in (query, key):
        t.copy_((t.float() * cos.float() + _rotate_half(t.float()) * sin.float()).to(t.dtype))
    return query, key


def npu_rotary_mul(
    self: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half", rotate: torch.Tensor | None = None
) -> torch.Tensor:
    """yaml npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None):
    self * r1 + rotate_half(self) * r2, r1/r2 broadcast (TND: T1D). Returns a new tensor."""
    if rotary_mode != "half" or rotate is not None:
        raise NotImplementedError("emulated npu_rotary_mul: only rotary_mode='half' without `rotate`")
    if self.dim() not in (3, 4) or self.shape[-1] % 2 or self.shape[-1] >= 896:
        raise ValueError(f"input must be 3-D/4-D with even D < 896, got {tuple(self.shape)}")
    out = self.float() * r1.float() + _rotate_half(self.float()) * r2.float()
    return out.to(self.dtype)


def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """doc npu_swiglu: A, B = halves of `self` along dim; swish(A) * B."""
    a, b = self.chunk(2, dim=dim)
    return (torch.nn.functional.silu(a.float()) * b.float()).to(self.dtype)
