"""The CPU table's fused decode path (kernels/decode.c through cpu_decode.py) against the path it replaces: the same
op table's modules-level ops (CpuOps(fused_decode=False)), one op at a time, themselves checked against torch's
and HF's elsewhere (test_cpu_fused.py, test_dense_vs_hf.py).

The weight products are the same gq.c function in both paths (bit for bit on equal inputs); the SwiGLU differs
from torch's vectorised silu by float32 rounding, which the next product's int16 activations can carry one step
further. Tolerances: one layer 2e-5 relative; whole models' logits max |diff| <= 2e-2 at logits of magnitude ~20
(measured: SmolLM2 4.9e-3 over 40 steps of 3 sequences) and greedy tokens equal.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardserve.workers.device import cpu_decode
from shardserve.workers.device.base import DecodeLayerSpec
from shardserve.workers.device.cpu import CpuOps
from shardserve.workers.distributed import TPGroup, init_tp_group
from shardserve.workers.loader import open_checkpoint
from shardserve.workers.model_runner import ModelRunner
from shardserve.workers.models import model_class
from shardserve.workers.quant import detect
from shardserve.workers.step import SeqStep
from shardserve.workers.worker import Worker
from tests.workers.device.test_cpu_fused import _decode_meta

REF, FUSED = CpuOps(fused_decode=False), CpuOps()
BLOCK = 16


def test_the_library_builds_here():
    assert cpu_decode.library() is not None  # else every test below would compare the modules with themselves


# ---- one random layer: the C blocks vs the table's ops -----------------------------------------------------
def _gq(N: int, K: int, g: torch.Generator, bits: int = 4):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, K // 32, generator=g) * 0.05 + 0.01
    return FUSED.pack_groups(q, scale, None, 32)


def _spec(g: torch.Generator, qk_norm: bool, bias: bool, window: int | None, mlp: bool = True) -> DecodeLayerSpec:
    H, heads, kv, D, inter = 128, 4, 2, 32, 96
    nqkv = (heads + 2 * kv) * D
    vec = lambda n: torch.randn(n, generator=g) * 0.2 + 1  # noqa: E731
    return DecodeLayerSpec(
        hidden=H, heads=heads, kv_heads=kv, head_dim=D, inter=inter if mlp else 0, eps=1e-5, scale=D**-0.5,
        window=window, input_norm=vec(H), post_norm=vec(H) if mlp else None,
        q_norm=vec(D) if qk_norm else None, k_norm=vec(D) if qk_norm else None,
        qkv_bias=torch.randn(nqkv, generator=g) * 0.1 if bias else None,
        qkv=_gq(nqkv, H, g), o=_gq(H, heads * D, g, bits=8), gate_up=_gq(2 * inter, H, g) if mlp else None,
        down=_gq(H, inter, g, bits=6) if mlp else None,
    )


def _reference_layer(s: DecodeLayerSpec, x, residual, cos_sin, kv, meta):
    """The layer as llama.py's modules compute it, through the reference table's ops."""
    T, D = x.shape[0], s.head_dim
    if residual is None:
        residual, h = x, REF.rms_norm(x, s.input_norm, s.eps)
    else:
        h, residual = REF.add_rms_norm(x, residual, s.input_norm, s.eps)
    qkv = REF.group_matmul(h, s.qkv)
    if s.qkv_bias is not None:
        qkv = qkv + s.qkv_bias
    q, k, v = qkv.split([s.heads * D, s.kv_heads * D, s.kv_heads * D], dim=-1)
    q, k, v = q.view(T, -1, D), k.view(T, -1, D), v.view(T, -1, D)
    if s.q_norm is not None:
        q, k = REF.rms_norm(q, s.q_norm, s.eps), REF.rms_norm(k, s.k_norm, s.eps)
    q, k = REF.rotary(q, k, *cos_sin)
    REF.write_kv(k, v, kv[0], kv[1], meta.slot_mapping)
    out = REF.paged_attention(q, kv[0], kv[1], meta, s.scale, s.window).reshape(T, -1)
    x = REF.group_matmul(out, s.o)
    h, residual = REF.add_rms_norm(x, residual, s.post_norm, s.eps)
    gate, up = REF.group_matmul(h, s.gate_up).chunk(2, dim=-1)
    return REF.group_matmul(torch.nn.functional.silu(gate) * up, s.down), residual


class _BlockByBlock(TPGroup):
    """A one-rank group the path takes block by block, as it does at TP > 1 (its all-reduce is the identity: the
    sum over one rank), so that the per-block calls are checked against the same reference as the whole call."""

    def __init__(self):
        super().__init__(0, 2)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("tp", [TPGroup(), _BlockByBlock()], ids=["one-call", "per-block"])
@pytest.mark.parametrize(
    "qk_norm,bias,window,rotated",
    [(False, False, None, 32), (True, True, None, 16), (False, True, 5, 32)],
    ids=["llama", "qwen-norm-bias-partial-rotary", "window"],
)
def test_two_layers_match_the_modules_ops(tp, qk_norm, bias, window, rotated):
    """Two layers (the first's residual is its input), three sequences of different lengths on scattered blocks."""
    g = torch.Generator().manual_seed(5)
    specs = [_spec(g, qk_norm, bias, window) for _ in range(2)]
    meta = _decode_meta([37, 3, 16], [[7, 2, 9], [4], [11]], BLOCK)
    angles = torch.rand(3, rotated // 2, generator=g) * 10
    cos_sin = (angles.cos(), angles.sin())
    x = torch.randn(3, 128, generator=g)
    caches = [(torch.randn(12, BLOCK, 2, 32, generator=g), torch.randn(12, BLOCK, 2, 32, generator=g)) for _ in specs]
    ref_caches = [(k.clone(), v.clone()) for k, v in caches]

    decoder = FUSED.fused_decoder(specs)
    assert decoder is not None and decoder.whole
    out, residual = decoder.forward(x, cos_sin, caches, meta, tp, modules=None)

    ref, ref_residual = x, None
    for s, kv in zip(specs, ref_caches):
        ref, ref_residual = _reference_layer(s, ref, ref_residual, cos_sin, kv, meta)
    for (k, v), (rk, rv) in zip(caches, ref_caches):
        assert torch.equal(k, rk) and torch.equal(v, rv)  # the new keys and values, each in its slot
    torch.testing.assert_close(residual, ref_residual, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


def test_layers_it_does_not_take():
    g = torch.Generator().manual_seed(6)
    spec = _spec(g, False, False, None)
    assert FUSED.fused_decoder([spec]) is not None
    assert CpuOps(fused_decode=False).fused_decoder([spec]) is None
    assert CpuOps(kernel="aten").fused_decoder([spec]) is None
    dense = dataclasses.replace(spec, qkv=REF.group_dequantize(spec.qkv))  # a float weight: not gq's
    assert FUSED.fused_decoder([dense]) is None
    bf16 = dataclasses.replace(spec, input_norm=spec.input_norm.bfloat16())
    assert FUSED.fused_decoder([bf16]) is None
    half_mlp = dataclasses.replace(spec, down=None)
    assert FUSED.fused_decoder([half_mlp]) is None


# ---- whole models: decode steps through both paths ----------------------------------------------------------
def _worker(path: str, ops: CpuOps) -> Worker:
    w = Worker(path, "cpu", "float32", None, 0, 1)
    w.backend = dataclasses.replace(w.backend, ops=ops)
    w.init("127.0.0.1", 0, threads=2)
    w.init_cache(num_blocks=64, block_size=BLOCK)
    return w


def _decode_both(fused: Worker, ref: Worker, prompts: list[list[int]], steps: int) -> tuple[float, int, int]:
    """Prefill, then `steps` greedy decode steps of all sequences at once, both workers fed the reference's tokens:
    (max |logit difference|, greedy agreements, decisions)."""
    tables = [list(range(b * 16, b * 16 + 16)) for b in range(len(prompts))]
    seqs = [SeqStep(b, p, 0, tables[b], True) for b, p in enumerate(prompts)]
    rows = list(range(len(prompts)))
    ref_logits = ref.runner.logits(seqs, rows)
    fused.runner.logits(seqs, rows)
    pos, worst, agree = [len(p) for p in prompts], 0.0, 0
    for _ in range(steps):
        tokens = ref_logits.argmax(-1).tolist()
        seqs = [SeqStep(b, [t], pos[b], tables[b], True) for b, t in enumerate(tokens)]
        ref_logits, ours = ref.runner.logits(seqs, rows), fused.runner.logits(seqs, rows)
        worst = max(worst, (ours - ref_logits).abs().max().item())
        agree += int((ours.argmax(-1) == ref_logits.argmax(-1)).sum())
        pos = [p + 1 for p in pos]
    return worst, agree, steps * len(prompts)


def test_smollm2_decodes_as_its_modules(smollm2_path):
    """The embedded default, every layer in one call a step (TP=1)."""
    fused, ref = _worker(smollm2_path, FUSED), _worker(smollm2_path, REF)
    decoder = fused.model.fused_decoder()
    assert decoder is not None and decoder.whole and ref.model.fused_decoder() is None
    worst, agree, n = _decode_both(fused, ref, [[5, 6, 7, 8, 9], list(range(10, 28)), [30]], 40)
    print(f"\nSmolLM2 fused vs modules: max |dlogit| {worst:.2e}, greedy {agree}/{n}")
    assert agree == n
    assert worst <= 2e-2


def _moe_gguf(name: str) -> str:
    from tests.fixtures import moe_models

    return moe_models.gguf_model(name, "Q8_0")


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])  # q/k norm; q/k/v bias and a shared expert
def test_moe_attention_fused_mlp_by_its_module(name):
    path = _moe_gguf(name)
    fused, ref = _worker(path, FUSED), _worker(path, REF)
    decoder = fused.model.fused_decoder()
    assert decoder is not None and not decoder.whole  # the experts stay the SparseMoeBlock's
    worst, agree, n = _decode_both(fused, ref, [[5, 6, 7], list(range(10, 30)), [40]], 24)
    assert agree == n
    assert worst <= 1e-3, worst


def test_a_model_moved_off_the_cpu_drops_the_path(smollm2_path):
    w = _worker(smollm2_path, FUSED)
    assert w.model.fused_decoder() is not None
    w.model.to("meta")
    assert w.model.fused_decoder() is None  # it pointed at the tensors .to() replaced


# ---- TP=2 (EP for the experts) over gloo: the attention blocks' partial sums all-reduced between calls ---------------------------
def _rank_main(rank: int, size: int, port: int, path: str, prompts: list[list[int]], steps: int, out: str) -> None:
    torch.set_num_threads(1)
    tp = init_tp_group("gloo", rank, size, "127.0.0.1", port)
    source, cfg = open_checkpoint(path)
    cfg = dataclasses.replace(cfg, enable_expert_parallel=True)  # Q8_0's blocks of 32 do not split the experts' 32
    model = model_class(cfg.architecture)(cfg, detect(path), tp, FUSED, torch.float32)
    model.load(source)
    assert model.fused_decoder() is not None
    shape = (64, BLOCK, model.kv_heads_local(), cfg.head_dim)
    runner = ModelRunner(model, [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)], BLOCK,
                         torch.device("cpu"))
    logits = _greedy(runner, prompts, steps)
    if rank == 0:
        torch.save(logits, out)
    dist.destroy_process_group()


def _greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Greedy decode logits [steps, B, V] (rank 0), every rank fed rank 0's tokens via a broadcast."""
    tables = [list(range(b * 16, b * 16 + 16)) for b in range(len(prompts))]
    rows = list(range(len(prompts)))
    seqs = [SeqStep(b, p, 0, tables[b], True) for b, p in enumerate(prompts)]
    pos, out = [len(p) for p in prompts], []
    logits = runner.logits(seqs, rows)
    for _ in range(steps):
        tokens = logits.argmax(-1) if logits is not None else torch.zeros(len(prompts), dtype=torch.long)
        if dist.is_initialized():
            dist.broadcast(tokens, 0)
        seqs = [SeqStep(b, [int(t)], pos[b], tables[b], True) for b, t in enumerate(tokens)]
        logits = runner.logits(seqs, rows)
        out.append(logits)
        pos = [p + 1 for p in pos]
    return torch.stack(out) if out[0] is not None else None


def test_tp2_matches_tp1(tmp_path: Path):
    path = _moe_gguf("qwen3_moe")
    prompts, steps = [[5, 6, 7], list(range(10, 30))], 12
    tp1 = _greedy(_worker(path, FUSED).runner, prompts, steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_main, args=(2, port, path, prompts, steps, out), nprocs=2, join=True)
    tp2 = torch.load(out)
    assert torch.equal(tp2.argmax(-1), tp1.argmax(-1))
    torch.testing.assert_close(tp2, tp1, atol=1e-3, rtol=0)
