"""Parallel linear layers: biases owned by the quant method (split with N, on one rank of a row-parallel layer,
loaded when the checkpoint has them), apply vs the method's reference, and the step's phase reaching every
linear layer of a model.

TP is simulated in-process: each rank's layer is built with its TPGroup(rank, size) and an all-reduce the test
performs itself by summing the ranks' outputs. Oracle: x @ W.T + b from the tensors written to the file; fp32,
tolerance 1e-5 (summation order only).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import save_file

from shardserve.workers.device.base import TorchOps
from shardserve.workers.distributed import TPGroup
from shardserve.workers.layers.linear import qkv_parallel, row_parallel
from shardserve.workers.loader import CheckpointError, open_checkpoint
from shardserve.workers.loader.safetensors_source import SafetensorsSource
from shardserve.workers.model_runner import ModelRunner
from shardserve.workers.models import model_class
from shardserve.workers.quant.base import LinearMethod, LinearSpec, QuantConfig
from shardserve.workers.quant.unquantized import Unquantized, UnquantizedLinearMethod
from shardserve.workers.step import SeqStep, StepPlan
from tests.fixtures.tiny_models import make_tiny

OPS = TorchOps()
F32 = dict(rtol=1e-5, atol=1e-5)
ATTN = "model.layers.0.self_attn"
HIDDEN, HEADS, KV, D = 64, 4, 2, 16


@dataclasses.dataclass(frozen=True)
class Unreduced(TPGroup):
    """One rank of a TP group whose all-reduce the test performs itself, by summing every rank's output."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _source(tmp_path, tensors: dict[str, torch.Tensor]) -> SafetensorsSource:
    os.makedirs(tmp_path, exist_ok=True)
    save_file({k: v.clone() for k, v in tensors.items()}, os.path.join(tmp_path, "model.safetensors"))
    return SafetensorsSource(str(tmp_path))


def _checkpoint(bias: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m, n in (("q_proj", HEADS * D), ("k_proj", KV * D), ("v_proj", KV * D), ("o_proj", HIDDEN)):
        out[f"{ATTN}.{m}.weight"] = torch.randn(n, HIDDEN, generator=g)
        if bias:
            out[f"{ATTN}.{m}.bias"] = torch.randn(n, generator=g)
    return out


def _qkv(tp: TPGroup, bias: bool):
    return qkv_parallel(f"{ATTN}.qkv_proj", HIDDEN, D, HEADS, KV, Unquantized(), tp, OPS, torch.float32, bias)


def test_row_parallel_bias_is_added_once_over_tp2(tmp_path):
    ckpt = _checkpoint()
    source = _source(tmp_path, ckpt)
    x = torch.randn(5, HIDDEN)
    expected = x @ ckpt[f"{ATTN}.o_proj.weight"].T + ckpt[f"{ATTN}.o_proj.bias"]
    ranks = [row_parallel(f"{ATTN}.o_proj", HIDDEN, HIDDEN, Unquantized(), Unreduced(r, 2), OPS, torch.float32, bias=True)
             for r in range(2)]
    for layer in ranks:
        layer.load(source)
    assert not ranks[1].bias.any()  # rank 1 holds zeros: the all-reduce adds rank 0's once
    halves = x.chunk(2, dim=-1)
    torch.testing.assert_close(sum(layer(h, True) for layer, h in zip(ranks, halves)), expected, **F32)
    # the un-reduced partials (what the MoE block's shared expert sums) count it once too
    torch.testing.assert_close(sum(layer.method.apply(layer, h, True) for layer, h in zip(ranks, halves)), expected, **F32)


def test_column_parallel_bias_splits_with_n(tmp_path):
    ckpt = _checkpoint()
    source = _source(tmp_path, ckpt)
    x = torch.randn(3, HIDDEN)
    full = {m: x @ ckpt[f"{ATTN}.{m}.weight"].T + ckpt[f"{ATTN}.{m}.bias"] for m in ("q_proj", "k_proj", "v_proj")}
    for r in range(2):
        layer = _qkv(TPGroup(r, 2), bias=True)
        layer.load(source)
        q, k, v = layer(x, False).split([HEADS * D // 2, D, D], dim=-1)  # 2 q heads, 1 kv head per rank
        torch.testing.assert_close(q, full["q_proj"].chunk(2, -1)[r], **F32)
        torch.testing.assert_close(k, full["k_proj"].chunk(2, -1)[r], **F32)
        torch.testing.assert_close(v, full["v_proj"].chunk(2, -1)[r], **F32)


def test_bias_the_config_does_not_announce_is_loaded(tmp_path):
    """ModelSlim anti-outlier files carry q/k/v biases on models whose config says attention_bias = false."""
    ckpt = _checkpoint()
    source = _source(tmp_path, ckpt)
    layer = _qkv(TPGroup(), bias=False)
    layer.load(source)
    assert source.unconsumed() == [f"{ATTN}.o_proj.bias", f"{ATTN}.o_proj.weight"]
    x = torch.randn(3, HIDDEN)
    w = torch.cat([ckpt[f"{ATTN}.{m}.weight"] for m in ("q_proj", "k_proj", "v_proj")])
    b = torch.cat([ckpt[f"{ATTN}.{m}.bias"] for m in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(layer(x, True), x @ w.T + b, **F32)


def test_a_bias_the_config_announces_must_be_there(tmp_path):
    with pytest.raises(CheckpointError, match=r"q_proj\.bias'.*missing"):
        _qkv(TPGroup(), bias=True).load(_source(tmp_path / "none", _checkpoint(bias=False)))
    partial = _checkpoint(bias=False) | {f"{ATTN}.q_proj.bias": torch.zeros(HEADS * D)}
    with pytest.raises(CheckpointError, match=r"k_proj\.bias'.*missing, while .*q_proj\.bias"):
        _qkv(TPGroup(), bias=False).load(_source(tmp_path / "partial", partial))


@pytest.mark.parametrize("rank", [0, 1])
def test_apply_matches_reference(tmp_path, rank: int):
    source = _source(tmp_path, _checkpoint())
    layers = [_qkv(TPGroup(rank, 2), bias=True),
              row_parallel(f"{ATTN}.o_proj", HIDDEN, HIDDEN, Unquantized(), TPGroup(rank, 2), OPS, torch.float32)]
    for layer in layers:
        layer.load(source)
        x = torch.randn(4, layer.spec.local_in)
        torch.testing.assert_close(layer.method.apply(layer, x, True), layer.method.reference(layer, x), **F32)


# ---- the step's phase reaches every linear layer ---------------------------------------------------------------
class PhaseSeen(UnquantizedLinearMethod):
    """The float method, noting which phase each call was told (a W8A8_MIX method would pick its formula by it)."""

    def __init__(self, seen: list[tuple[str, bool]]):
        self.seen = seen

    def apply(self, layer, x: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        self.seen.append((layer.spec.prefix, is_prefill))
        return super().apply(layer, x, is_prefill)


class PhaseFormat(QuantConfig):
    name = "test-phase"

    def __init__(self):
        self.seen: list[tuple[str, bool]] = []

    @classmethod
    def detect(cls, model_path: str) -> None:
        return None

    def linear_method(self, spec: LinearSpec) -> LinearMethod:
        return PhaseSeen(self.seen)


def test_every_linear_layer_knows_prefill_from_decode(cache_dir):
    path = make_tiny("llama", cache_dir)
    source, cfg = open_checkpoint(path)
    quant = PhaseFormat()
    model = model_class(cfg.architecture)(cfg, quant, TPGroup(), OPS, torch.float32)
    model.load(source)
    caches = [(torch.zeros(4, 16, cfg.num_kv_heads, cfg.head_dim), torch.zeros(4, 16, cfg.num_kv_heads, cfg.head_dim))
              for _ in range(cfg.num_layers)]
    runner = ModelRunner(model, caches, 16, torch.device("cpu"))
    linears = 4 * cfg.num_layers  # qkv, o_proj, gate_up, down
    for plan, prefill in [
        (StepPlan([SeqStep(0, [5, 6, 7, 8], 0, [0], True), SeqStep(1, [9], 0, [1], True)]), True),  # one prefill chunk
        (StepPlan([SeqStep(0, [10], 4, [0], True), SeqStep(1, [11], 1, [1], True)]), False),  # decode only
    ]:
        quant.seen.clear()
        runner.execute(plan)
        assert len(quant.seen) == linears and {p for _, p in quant.seen} == {prefill}
