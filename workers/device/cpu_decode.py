"""The CPU table's fused decode path (kernels/decode.c): a llama-family layer's decode step in two C calls (attention
block, MLP block), every layer in one call at TP = 1, instead of some fifteen torch ops and Python calls a layer.

It takes a model only where every layer's weights are gq.c's (kept-quantized GGUF, or weight-only formats without
an input permutation) and every float tensor is float32 on the CPU; anything else keeps the modules' forward.
The products are the same gq.c calls the modules make (bit for bit); RMSNorm, rotary and attention are fused.c's,
as the CPU table's ops are; the SwiGLU (fused.c's too) is x / (1 + e^-x) * up in float32 with e^x within 1 ulp,
which may differ from torch's vectorised silu by float32 rounding (tests/workers/device/test_cpu_decode.py
compares the two paths).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from shardserve.workers.device import cpu_gq, cpu_native
from shardserve.workers.device.base import AttentionMetadata, DecodeLayerSpec
from shardserve.workers.device.cpu_native import FLOAT, I64, INT, P
from shardserve.workers.device.quant_ops import GroupWeight
from shardserve.workers.distributed import TPGroup


class _Layer(ctypes.Structure):
    """decode.c's decode_layer."""

    _fields_ = [(n, I64) for n in ("hidden", "heads", "kv_heads", "head_dim", "inter")] + [
        ("eps", FLOAT), ("scale", FLOAT), ("window", I64)
    ] + [(n, P) for n in ("input_norm", "post_norm", "q_norm", "k_norm", "qkv_bias", "qkv", "o", "gate_up", "down")]


class _Step(ctypes.Structure):
    """decode.c's decode_step."""

    _fields_ = [("B", I64), ("cos", P), ("sin", P), ("half", I64), ("slots", P), ("block_tables", P),
                ("max_blocks", I64), ("context_lens", P), ("block_size", I64), ("scratch", P), ("nthreads", INT)]


_L, _S = ctypes.POINTER(_Layer), ctypes.POINTER(_Step)
_SIGNATURES = {
    "decode_attention_block": [_L, _S, P, P, INT, P, P, P],
    "decode_mlp_block": [_L, _S, P, P, P],
    "decode_layers": [P, I64, _S, P, P, P, P, P],
}
_WEIGHTS = ("qkv", "o", "gate_up", "down")
_VECTORS = ("input_norm", "post_norm", "q_norm", "k_norm", "qkv_bias")


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = cpu_native.library()
    if lib is not None:
        cpu_native.declare(lib, _SIGNATURES)
        lib.decode_scratch_floats.argtypes, lib.decode_scratch_floats.restype = [_L, I64], I64
    return lib


def takes(spec: DecodeLayerSpec) -> bool:
    """Whether decode.c computes this layer (its attention at least): gq weights and float32 vectors on the CPU."""
    weights = [w for w in (getattr(spec, n) for n in _WEIGHTS) if w is not None]
    vectors = [v for v in (getattr(spec, n) for n in _VECTORS) if v is not None]
    return (
        spec.qkv is not None and spec.o is not None
        and (spec.gate_up is None) == (spec.down is None)
        and all(isinstance(w, GroupWeight) and w.layout == "gq" and w.scale.device.type == "cpu" for w in weights)
        and all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in vectors)
    )


class FusedDecoder:
    """Built once for a model's layers (their tensors must stay where they are: the model drops it on `.to()`)."""

    def __init__(self, lib: ctypes.CDLL, specs: list[DecodeLayerSpec]):
        self.lib, self.specs = lib, specs  # the specs keep every tensor the structs point at alive
        self.layers = [self._layer(s) for s in specs]
        self.layer_ptrs = (ctypes.c_void_p * len(specs))(*[ctypes.addressof(layer) for layer in self.layers])
        self.whole = all(s.gate_up is not None for s in specs)  # every MLP computed here too
        self.scratch_per_row = max(lib.decode_scratch_floats(ctypes.byref(layer), 1) for layer in self.layers)
        self._scratch = torch.empty(0)

    @staticmethod
    def _layer(s: DecodeLayerSpec) -> _Layer:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        weights = [None if getattr(s, n) is None else ctypes.addressof(cpu_gq.weight_struct(getattr(s, n)))
                   for n in _WEIGHTS]  # each struct held by its weight
        return _Layer(s.hidden, s.heads, s.kv_heads, s.head_dim, s.inter, s.eps, s.scale, s.window or 0,
                      *[ptr(getattr(s, n)) for n in _VECTORS], *weights)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_caches, meta: AttentionMetadata,
        tp: TPGroup, modules,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every layer's decode step: x [B, hidden] the embeddings -> (the last layer's output, the residual before
        it), what the modules' loop hands the final norm; None where the caches are not float32 and contiguous.
        `modules`: the decoder layers, whose post_attention_layernorm and mlp run the MLPs this path does not."""
        k0 = kv_caches[0][0]
        if k0.dtype != torch.float32 or k0.device.type != "cpu" or not k0.is_contiguous():
            return None
        B = x.shape[0]
        x = x.float().contiguous().clone()  # written in place
        residual = torch.empty_like(x)
        step, _held = self._step(B, cos_sin, meta, k0)  # _held: what step points at, alive until we return
        lib, sp = self.lib, ctypes.byref(step)
        if tp.size == 1 and self.whole:
            kp = (ctypes.c_void_p * len(kv_caches))(*[k.data_ptr() for k, _ in kv_caches])
            vp = (ctypes.c_void_p * len(kv_caches))(*[v.data_ptr() for _, v in kv_caches])
            tmp = torch.empty_like(x)  # named: a temporary's memory would be freed before the call
            lib.decode_layers(self.layer_ptrs, len(self.layers), sp, kp, vp, x.data_ptr(), residual.data_ptr(),
                              tmp.data_ptr())
            return x, residual
        modules = [None] * len(self.layers) if modules is None else modules  # None: every MLP is computed here
        for i, (layer, spec, module, (k, v)) in enumerate(zip(self.layers, self.specs, modules, kv_caches)):
            out = torch.empty_like(x)
            lib.decode_attention_block(ctypes.byref(layer), sp, x.data_ptr(), residual.data_ptr(), i == 0,
                                       k.data_ptr(), v.data_ptr(), out.data_ptr())
            x = tp.all_reduce(out)
            if spec.gate_up is None:  # the module's norm and MLP (its down product all-reduces itself)
                h, residual = module.post_attention_layernorm(x, residual)
                x = module.mlp(h, False).float().contiguous()
                residual = residual.contiguous()
                continue
            out = torch.empty_like(x)
            lib.decode_mlp_block(ctypes.byref(layer), sp, x.data_ptr(), residual.data_ptr(), out.data_ptr())
            x = tp.all_reduce(out)
        return x, residual

    def _step(self, B: int, cos_sin, meta: AttentionMetadata, k_cache: torch.Tensor):
        """decode.c's decode_step for this batch, and the tensors it points at (held by the caller for the call)."""
        cos, sin = (t.float().contiguous() for t in cos_sin)
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables = meta.block_tables.to(torch.int64).contiguous()
        lens = meta.context_lens.to(torch.int64).contiguous()
        if self._scratch.numel() < B * self.scratch_per_row:
            self._scratch = torch.empty(B * self.scratch_per_row)
        step = _Step(B, cos.data_ptr(), sin.data_ptr(), cos.shape[-1], slots.data_ptr(), tables.data_ptr(),
                     tables.shape[1], lens.data_ptr(), k_cache.shape[1], self._scratch.data_ptr(), torch.get_num_threads())
        return step, (cos, sin, slots, tables, lens)
