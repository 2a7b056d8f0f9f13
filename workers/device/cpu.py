"""The CPU backend: plain torch ops, our group-quantized weight kernel (cpu_gq.py; ATen's CPU int4 kernel where no C
compiler builds it), ATen's int8 GEMM for W8A8-style schemes, gloo collectives."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from shardserve.workers.device import cpu_decode, cpu_fused, cpu_gq
from shardserve.workers.device.base import AttentionMetadata, DecodeLayerSpec, DeviceBackend, TorchOps
from shardserve.workers.device.quant_ops import GroupWeight, _dequantize_groups, narrowest_exact

# ATen's CPU int4 kernels (torch >= 2.5): weight [N, K] in a blocked nibble layout, activations and
# scales/zeros in one dtype; _weight_int4pack_mm_cpu checks N % 16 == 0, G in {32, 64, 128, 256} and K % G == 0.
# Only its bf16 variant is vectorized (fp32 and fp16 run a scalar loop, ~30x slower than bf16 here).
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_KERNEL_GROUPS = (32, 64, 128, 256)


class CpuOps(TorchOps):
    """TorchOps, with a kernel for group-quantized (GGUF) weights: cpu_gq.py's ("gq", the default), or ATen's bf16
    int4 weight-only matmul where `kernel="aten"` or no C compiler builds ours.

    "gq" (cpu_gq.py): every integer type at its own width (4, 5, 6 or 8 bits a value) with its exact scales, one
    copy for a tied embedding and head, stacked MoE experts too; activations are held as int16 per 32 values (15
    bits of each chunk's largest: SmolLM2 Q4_1's logits at a mean KL of 9e-8 from fp32's, test_dense_vs_hf.py).
    Its memory per value, type by type against the file, is in workers/quant/gguf.py's docstring.

    ATen's layouts (pack_groups with kernel "aten"; the kernel computes w = (u - 8) * s + z per group, u in 0..15):
    - "int4pack": values spanning 16 integers (Q4_0, Q4_1, Q4_K, TQ*): u = q + 8 with z = zero where q fits
      [-8, 7] (Q4_0, TQ*), else u = q - lo with z = zero + (lo + 8) * scale (Q4_1, Q4_K).
    - "int4pack2": int8 values (Q5_*, Q8_0, IQ4_*, MXFP4) as two int4 weights, q = 16 hi + lo_nibble:
      hi + 8 with scale 16 * scale and zero + 8 * scale, and lo_nibble with scale alone; y is the sum of two
      kernel calls.
    - the reference "groups" layout (dequantized at each call) where the kernel does not fit: groups of 16
      (Q2_K, Q3_K, Q6_K, NVFP4), N % 16 != 0, stacked MoE experts.
    An embedding (pack_groups(lookup=True)) holds the same nibbles with its exact scales (float16 where GGUF's
    fp16 d and m make that exact) instead of the kernel's bf16 ones, and group_rows reads its rows from the
    nibbles; a tied head adds the bf16 scales (tie_groups), so a tied vocabulary is held once.
    ATen's kernel rounds activations, scales and zeros to bf16 (8 significant bits; fp16 d has 11) and each output
    to bf16, accumulating in fp32: on SmolLM2 Q4_1 that moves fp32 logits by a mean KL of ~3e-4 against the
    dequantized weights, within the HF-vs-llama.cpp noise floor (tests/workers/quant/test_gguf_groups.py).
    """

    def __init__(self, kernel: str = "auto", fused_decode: bool = True):
        """`fused_decode`: decode steps of gq-weighted llama-family models through cpu_decode.py (one C call a step
        at TP = 1); off, they run the modules' forward (the reference the fused path is tested against)."""
        if kernel not in ("auto", "gq", "aten"):
            raise ValueError(f"kernel must be auto, gq or aten, not {kernel!r}")
        self.kernel, self.fused_decode = kernel, fused_decode

    @property
    def gq(self) -> bool:
        """Whether pack_groups takes our kernel (built on first use): "auto" where it builds with its AVX2 path (its
        portable C is for correctness, slower than ATen's vectorised kernel), "gq" wherever it builds."""
        if self.kernel == "aten":
            return False
        lib = cpu_gq.library()
        if lib is None and self.kernel == "gq":
            raise RuntimeError("the CPU's C kernels (workers/device/kernels) did not build: see the log for the compiler's errors")
        return lib is not None and (self.kernel == "gq" or cpu_gq.simd(lib) > 0)

    def fused_decoder(self, specs: list[DecodeLayerSpec]) -> cpu_decode.FusedDecoder | None:
        lib = cpu_decode.library() if self.fused_decode and self.gq else None
        if lib is None or not specs or not all(cpu_decode.takes(s) for s in specs):
            return None
        return cpu_decode.FusedDecoder(lib, specs)

    # ---- fused float32 decode ops (cpu_fused.py), torch's where they do not apply -------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        fused = cpu_fused.add_rms_norm(x, None, weight, eps)
        return super().rms_norm(x, weight, eps) if fused is None else fused[0]

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = cpu_fused.add_rms_norm(x, residual, weight, eps)
        return super().add_rms_norm(x, residual, weight, eps) if fused is None else fused

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rq, rk = cpu_fused.rotary(q, cos, sin), cpu_fused.rotary(k, cos, sin)
        return super().rotary(q, k, cos, sin) if rq is None or rk is None else (rq, rk)

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """Decode steps (one query per sequence) read the paged cache in place (fused.c); prefill takes SDPA."""
        if meta.max_q == 1:
            out = cpu_fused.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, window)
            if out is not None:
                return out
        return super().paged_attention(q, k_cache, v_cache, meta, scale, window)

    # ---- group-quantized weights -----------------------------------------------------------------------------
    def pack_groups(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, lookup: bool = False
    ) -> GroupWeight:
        """Our kernel's layout where it fits, else ATen's. An ATen lookup weight holds the kernel's nibbles with the
        exact scales (`row_scale`, `row_zero`) that group_rows reads, not the kernel's bf16 ones: tie_groups adds
        those."""
        if self.gq and cpu_gq.fits(q, group):
            return cpu_gq.pack(q, scale, zero, group)
        N, K = q.shape[-2:]
        fits = q.dim() == 2 and _HAS_INT4_KERNEL and group in _KERNEL_GROUPS and not N % 16 and not K % group
        if not fits or (lookup and _nibble_layout() is None):
            return super().pack_groups(q, scale, zero, group, lookup)
        lo, hi = int(q.min()), int(q.max())
        if hi - lo < 16:
            # u = q + shift: centred (shift 8, the zero untouched) where q fits [-8, 7], so that small values
            # (TQ's -1..1) are not the difference of two large bf16-rounded terms; else u = q - lo
            shift = 8 if -8 <= lo and hi <= 7 else -lo
            w = GroupWeight("int4pack", (N, K), group, bits=4, lo=-shift, packed=_pack(q, lambda u: u.add_(shift)))
        else:
            # int8 q = 16 hi + lo4: hi = q >> 4 (arithmetic shift: floor) in [-8, 7], lo4 = q & 15
            hi, lo4 = _pack(q, lambda u: u.bitwise_right_shift_(4).add_(8)), _pack(q, lambda u: u.bitwise_and_(15))
            w = GroupWeight("int4pack2", (N, K), group, bits=8, hi=hi, lo4=lo4)
        if lookup:
            w.register_buffer("row_scale", narrowest_exact(scale), persistent=False)
            w.register_buffer("row_zero", None if zero is None else narrowest_exact(zero), persistent=False)
        else:
            _hold_kernel_scales(w, scale, zero)
        return w

    def tie_groups(self, w: GroupWeight) -> GroupWeight:
        """A kernel-layout lookup weight gains the kernel's bf16 scales, computed from its exact ones as pack_groups
        computes them: one copy of the values serves the embedding and the tied head ("gq" as it is)."""
        if w.layout == "gq":
            return w
        if w.layout in _KERNEL_LAYOUTS:
            if not _multipliable(w):
                _hold_kernel_scales(w, w.row_scale, w.row_zero)
            return w
        return super().tie_groups(w)

    def _int_sums(self, x_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """int8 x int8 -> int32 through ATen's CPU int8 GEMM (exact for K < 2^17), which takes any shape; int4 values
        held in int8 (W4A4, W4A8) go the same way."""
        if x_q.dtype == torch.int8 and w.dtype == torch.int8:
            return torch._int_mm(x_q.contiguous(), w.t())  # [M, K] @ [K, N]
        return super()._int_sums(x_q, w)

    def group_matmul(self, x: torch.Tensor, w: GroupWeight) -> torch.Tensor:
        if w.layout == "gq":
            return cpu_gq.matmul(x, w).to(x.dtype)
        if w.layout == "int4pack":
            return _kernel(x, w.packed, w.group, w.sz).to(x.dtype)
        if w.layout == "int4pack2":
            return (_kernel(x, w.hi, w.group, w.sz_hi).float() + _kernel(x, w.lo4, w.group, w.sz_lo).float()).to(x.dtype)
        return super().group_matmul(x, w)

    def grouped_group_matmul(self, x: torch.Tensor, w: GroupWeight, group_counts: torch.Tensor) -> torch.Tensor:
        if w.layout == "gq":
            return cpu_gq.grouped_matmul(x, w, group_counts).to(x.dtype)
        return super().grouped_group_matmul(x, w, group_counts)

    def group_dequantize(self, w: GroupWeight) -> torch.Tensor:
        """What the kernel multiplies by (the bf16 scales and zeros applied to the exact values); a lookup weight
        not tied to a head: its exact rows."""
        if w.layout == "gq":
            return cpu_gq.dequantize(w)
        if w.layout in _KERNEL_LAYOUTS and not _multipliable(w):
            return self.group_rows(w, torch.arange(w.shape[0], device=w.row_scale.device))
        if w.layout == "int4pack":
            return _dequantize_int4(_unpack(w.packed, w.sz, w.group), w.sz, w.group)
        if w.layout == "int4pack2":
            high = _dequantize_int4(_unpack(w.hi, w.sz_hi, w.group), w.sz_hi, w.group)
            return high + _dequantize_int4(_unpack(w.lo4, w.sz_lo, w.group), w.sz_lo, w.group)
        return super().group_dequantize(w)

    def group_rows(self, w: GroupWeight, ids: torch.Tensor) -> torch.Tensor:
        """Rows read from the kernel's nibbles (no unpacked copy) with the exact scales: gguf-py's values."""
        if w.layout == "gq":
            return cpu_gq.rows(w, ids)
        if w.layout not in _KERNEL_LAYOUTS:
            return super().group_rows(w, ids)
        where = _nibble_where(*w.shape, ids, _nibble_layout())
        if w.layout == "int4pack":
            q = _read_nibbles(w.packed, where).to(torch.int16) + w.lo  # [T, K]
        else:  # q = 16 (hi - 8) + lo4
            q = torch.add(_read_nibbles(w.lo4, where).to(torch.int16), _read_nibbles(w.hi, where), alpha=16) - 128
        zero = None if w.row_zero is None else w.row_zero.index_select(0, ids)
        return _dequantize_groups(q, w.row_scale.index_select(0, ids), zero, w.group)


_KERNEL_LAYOUTS = ("int4pack", "int4pack2")


def _multipliable(w: GroupWeight) -> bool:
    """Whether a kernel-layout weight holds the kernel's scales (not a lookup weight untied to a head)."""
    return hasattr(w, "sz") or hasattr(w, "sz_hi")


def _hold_kernel_scales(w: GroupWeight, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """The kernel's [K/G, N, 2] bf16 scales and zeros for w's nibbles (w = (u - 8) * s + z per group). int4pack2:
    the zero and the 8 go with hi, so the second call's part (lo4 - 8) * scale is small and centred: the two
    bf16-rounded outputs then do not cancel (with the zero on lo4, Q5_K's parts did, 40x the error)."""
    s = scale.float()
    z = torch.zeros_like(s) if zero is None else zero.float()
    if w.layout == "int4pack":
        shift = -w.lo
        w.register_buffer("sz", _scales_zeros(s, z if shift == 8 else z + (8 - shift) * s), persistent=False)
    else:
        w.register_buffer("sz_hi", _scales_zeros(16 * s, z + 8 * s), persistent=False)
        w.register_buffer("sz_lo", _scales_zeros(s, torch.zeros_like(s)), persistent=False)


_Where = tuple[tuple[int, ...], tuple, torch.Tensor]  # a view's shape, the index into it, each row's shift


def _nibble_where(N: int, K: int, ids: torch.Tensor, layout: tuple[int, bool]) -> _Where:
    """Where rows `ids` [T] of u [N, K] (0..15) lie in ATen's CPU int4 layout [N, K/2] uint8, as
    weight_to_int4pack_kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp) places them: rows in blocks of BLOCK_N
    (Vectorized<float>::size() * 4: 64 under AVX512, 32 under AVX2 and x86's scalar build), block b at byte b * BLOCK_N * K / 2, each
    block stored k-major. In a full block under AVX2/AVX512 ("lanes") row r's value k is byte k * BLOCK_N/2 +
    r % (BLOCK_N/2), high nibble from r >= BLOCK_N/2; otherwise (a last, partial block of nb rows, or the scalar
    build) byte k * nb/2 + r // 2, high nibble for odd r. `layout`: (BLOCK_N, lanes), this build's (_nibble_layout)."""
    block_n, lanes = layout
    half = block_n // 2
    b, r = ids // block_n, ids % block_n  # [T]
    if N % block_n == 0:  # whole blocks (every vocabulary here): one gather from the [N/B, K, B/2] view
        col, high = (r % half, r // half) if lanes else (r // 2, r % 2)
        return (N // block_n, K, half), (b, slice(None), col), (4 * high).unsqueeze(1).to(torch.uint8)
    nb = (N - b * block_n).clamp(max=block_n)  # rows in the block
    stride, col, high = nb // 2, r // 2, r % 2
    if lanes:
        full = nb == block_n
        stride, col, high = torch.where(full, half, stride), torch.where(full, r % half, col), torch.where(full, r // half, high)
    k = torch.arange(K, device=ids.device)
    at = (b * (block_n * K // 2) + col).unsqueeze(1) + k * stride.unsqueeze(1)  # [T, K] byte offsets
    return (N * K // 2,), (at,), (4 * high).unsqueeze(1).to(torch.uint8)


def _read_nibbles(packed: torch.Tensor, where: _Where) -> torch.Tensor:
    """The rows _nibble_where located: uint8 [T, K] in 0..15."""
    shape, index, shift = where
    return (packed.view(shape)[index] >> shift) & 15


def _gather_nibbles(packed: torch.Tensor, ids: torch.Tensor, K: int, layout: tuple[int, bool]) -> torch.Tensor:
    """Rows `ids` of u [N, K] from one int4pack plane."""
    return _read_nibbles(packed, _nibble_where(packed.shape[0], K, ids, layout))


@functools.cache
def _nibble_layout() -> tuple[int, bool] | None:
    """(BLOCK_N, lanes) of this build's int4 packing: a probe u [176, 64] (full blocks and a partial one under
    each BLOCK_N) is packed and read back under each layout weight_to_int4pack_kernel has; None when none reads
    it back exactly (lookups then keep the reference layout, a second copy for a tied head)."""
    if not _HAS_INT4_KERNEL:
        return None
    u = torch.randint(0, 16, (176, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (176, 32):
        return None
    ids = torch.arange(176)
    for layout in ((64, True), (32, True), (32, False), (16, False), (64, False)):
        if torch.equal(_gather_nibbles(packed, ids, 64, layout).to(torch.int32), u):
            return layout
    return None


_PACK_ROWS = 1024  # rows converted at a time (the layout tiles N by 64, so whole chunks concatenate exactly)


def _pack(q: torch.Tensor, nibbles: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[N, K] int8 values -> ATen's CPU int4 layout [N, K/2] uint8 of nibbles(q) (in place on an int32 copy, values
    0..15). ATen takes int32: a large matrix, a vocabulary, is converted 1024 rows at a time into the output, so
    that the int32 copy and the nibbles stay a chunk's size."""
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    N, K = q.shape
    rows = _PACK_ROWS if N % _PACK_ROWS == 0 else N
    out = torch.empty(N, K // 2, dtype=torch.uint8)
    for start in range(0, N, rows):
        out[start : start + rows] = convert(nibbles(q[start : start + rows].to(torch.int32)), 1)
    return out


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale, zero [N, K/G] float32 -> the kernel's [K/G, N, 2] bf16."""
    return torch.stack((scale, zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def _kernel(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, group, sz)  # [T, N]


def _unpack(packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The kernel's u [N, K] back, exactly: with scale 1 and zero 8 it returns u itself, and identity rows pick
    out each k."""
    G, N = sz.shape[0], sz.shape[1]
    K = G * group
    ones = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(G, N, 2).contiguous()
    u_t = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16), packed, group, ones)  # [K, N]
    return u_t.T.float()


def _dequantize_int4(u: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """u [N, K] in 0..15, sz [K/G, N, 2] -> (u - 8) * scale + zero, float32 [N, K]."""
    scale, zero = sz.float().permute(2, 1, 0)  # [N, K/G] each
    return _dequantize_groups(u - 8, scale, zero, group)


def backend() -> DeviceBackend:
    return DeviceBackend(name="cpu", dist_backend="gloo", ray_resource="CPU", ops=CpuOps())


def available() -> bool:
    return True
