"""A qwen3moe quantized by llama.cpp to K-quants (tests/fixtures/gguf_quantized.py): our model vs HF transformers'
Qwen3MoeForCausalLM on the file's weights as gguf-py dequantizes them, and TP=2 / EP=2 vs TP=1.

Teacher-forced over SEQ (random ids, fixed seed), fp32. Figures: top-1 agreement, max |log-prob difference|,
mean full-vocabulary KL(p_HF || p_ours). Tolerances: top-1 >= 0.98 and mean KL at most a tenth of what quantizing
the file's F32 weights to Q6_K changes in HF's own output (KL(p_HF,F32 || p_HF,Q6_K), printed per test as
"quantization effect", about 3e-3): a weight loaded wrong (an expert swapped, a scale misread) moves the output
by about that much or more. That bound judges the weights kept quantized in the exact plain-torch layout (the op
table CUDA runs; TorchOps here), which measures ~1e-13 to ~1e-5. The default CPU op table's kernels round
activations, scales and outputs to bf16: judged at top-1 >= 0.9 and KL <= the quantization effect itself (on
this tiny random model measured up to KL 1.4e-3 for IQ4_XS, 8.6e-4 for Q5_K_M, 1e-5 for Q4_K_M).
TP / EP vs TP=1: the same rule as vs HF (a bf16-rounding kernel rounds each rank's partial sums: measured on the
kept-quantized path max |dlogit| 1.1e-2 at logits up to 2.6, KL 3e-6; ~2e-6 dequantized fp32).
"""

from __future__ import annotations

import dataclasses
from functools import cache

import pytest
import torch

from shardserve.workers.device.base import TorchOps
from shardserve.workers.worker import Worker
from tests.workers.quant.test_gguf_types_vs_llamacpp import loading_path

DEFAULT = ("Q4_K_M",)
SLOW = ("Q2_K", "Q3_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE")


@cache
def fixtures():
    """Imported on first use: it imports llama_cpp and transformers."""
    from tests.fixtures import gguf_quantized

    return gguf_quantized


@cache
def seq() -> tuple[int, ...]:
    g = torch.Generator().manual_seed(11)
    return tuple(torch.randint(0, fixtures().MOE_SPEC.vocab, (96,), generator=g).tolist())


@cache
def hf_logprobs(path: str) -> torch.Tensor:
    hf = fixtures().moe_hf_on_gguf(path)
    hf.set_experts_implementation("eager")  # HF's per-expert loop: not the grouped_mm our CPU op also uses
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([seq()])).logits[0].double(), -1)  # [T, V]


def our_worker(path: str, exact: bool = False) -> Worker:
    """`exact`: the plain-torch op table (GGUF kept quantized in the exact reference layout), not the CPU's."""
    worker = Worker(path, "cpu", "float32", None, 0, 1)
    if exact:
        worker.backend = dataclasses.replace(worker.backend, ops=TorchOps())
    worker.init("127.0.0.1", 0)
    worker.init_cache(16, 16)
    return worker


def kl(lp_ref: torch.Tensor, lp: torch.Tensor) -> float:
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()


def quantization_effect() -> float:
    """KL(p_HF on the F32 weights || p_HF on their Q6_K quantization): the scale a misloaded weight reaches."""
    return kl(hf_logprobs(fixtures().moe_f32()), hf_logprobs(fixtures().moe("Q6_K").path))


def compare(ftype: str) -> None:
    variant = fixtures().moe(ftype)
    ref = hf_logprobs(variant.path)
    effect = quantization_effect()
    for exact in (True, False):
        worker = our_worker(variant.path, exact)
        ours = torch.log_softmax(worker.score(list(seq())).double(), -1)  # [T, V]
        top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        diff, divergence = (ours - ref).abs().max().item(), kl(ref, ours)
        table = "exact layout" if exact else "CPU kernels"
        print(f"\nqwen3moe {ftype} ({variant.types_text()}; quantized in {variant.quantize_s:.1f} s), {table}, vs HF "
              f"over {len(seq())} positions: top-1 {top1:.4f}, max |dlogp| {diff:.2e}, KL {divergence:.2e}; "
              f"quantization effect F32 -> Q6_K: KL {effect:.2e}\n  our layers: {loading_path(worker)}")
        if exact:
            assert top1 >= 0.98, f"{ftype}: top-1 {top1:.4f}"
            assert divergence <= effect / 10, f"{ftype}: KL {divergence:.2e} vs quantization effect {effect:.2e}"
        else:
            assert top1 >= 0.9, f"{ftype}, CPU kernels: top-1 {top1:.4f}"
            assert divergence <= effect, f"{ftype}, CPU kernels: KL {divergence:.2e} vs quantization effect {effect:.2e}"


@pytest.mark.parametrize("ftype", DEFAULT)
def test_moe_kquant_matches_hf_on_dequantized_weights(ftype: str):
    compare(ftype)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", SLOW)
def test_moe_kquant_matches_hf_on_dequantized_weights_slow(ftype: str):
    compare(ftype)


def test_every_moe_type_is_tested_once():
    assert sorted(DEFAULT + SLOW) == sorted(fixtures().MOE_TYPES)


@pytest.mark.parametrize("size,ep", [(2, False), (2, True)], ids=["tp2", "ep2"])
def test_moe_kquant_splits_match_tp1(ray_session, size: int, ep: bool):
    """TP=2 splits each expert's 512-wide intermediate into two 256-wide K-quant blocks per row; EP=2 gives each
    rank 2 of the 4 experts whole. Both through Ray worker actors and gloo, like serving."""
    from shardserve import LLM

    path = fixtures().moe("Q4_K_M").path
    tp1 = our_worker(path).score(list(seq()))  # [T, V]
    with LLM(path, tp_size=size, device="cpu", kv_cache_memory_gb=0.1, cpu_threads_per_worker=1,
             enable_expert_parallel=ep) as llm:
        split = llm.score(list(seq()))
    diff = (split - tp1).abs().max().item()
    lp1, lp = torch.log_softmax(tp1.double(), -1), torch.log_softmax(split.double(), -1)
    top1, divergence = (split.argmax(-1) == tp1.argmax(-1)).float().mean().item(), kl(lp1, lp)
    effect = quantization_effect()
    print(f"\nqwen3moe Q4_K_M {'EP' if ep else 'TP'}={size} vs TP=1: top-1 {top1:.4f}, max |dlogit| {diff:.2e}, "
          f"KL {divergence:.2e}; quantization effect {effect:.2e}")
    assert top1 >= 0.98 and divergence <= effect / 10
