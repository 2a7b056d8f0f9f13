"""SmolLM2 in every type llama.cpp's quantizer makes (tests/fixtures/gguf_quantized.py): our teacher-forced logits
vs llama.cpp's on the same file, within the noise floor that HF transformers vs llama.cpp shows on that file.

Three models score the same token ids (TEXT through our GGUF tokenizer): llama.cpp (`llama_cpp.Llama`,
`logits_all=True`), HF transformers' LlamaForCausalLM on the file's weights as gguf-py dequantizes them (fp32),
and ours (an in-process TP=1 Worker, dtype float32, the default loading path and whatever kernels it picks; each
test prints the layouts it found).

Figures, per position then averaged over every position of TEXT:
- top-1: the two models' argmax tokens agree;
- KL@20: KL(p || q) over the reference's 20 most likely tokens, each distribution restricted to those 20 and
  renormalised (p the reference, llama.cpp or HF; q the other model); KL: the same over the full vocabulary.
The floor is HF vs llama.cpp. Bound (the issue's: agreement with llama.cpp or with the fp32 dequantized reference
at least as good as the floor): ours vs HF within it, top-1 >= floor top-1 - TOP1_SLACK and KL@20 <= KL_FACTOR *
floor KL@20 + KL_ABS; ours vs llama.cpp within it on KL@20 and, unless ours vs HF's KL@20 is under half the
floor's (our kernels' rounding adding flips at llama.cpp's near-ties: Q5_K_M disagrees with llama.cpp at 8
of 123 positions where HF does at 4, with ours vs HF at KL@20 8.6e-4, a sixth of the floor), on top-1 too.
The issue's figure for HF vs llama.cpp on SmolLM2 Q4_1 is top-1 0.974, KL@20 0.0036; on TEXT this test measures
0.9675 and 2.4e-3 (floors of all types: top-1 0.92-0.97, KL@20 2.4e-3-6.1e-3). The ternary types are judged
on the MoE (tests/fixtures/gguf_quantized.py says why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

import pytest
import torch

from shardserve.workers.loader.tokenizer import Tokenizer
from shardserve.workers.worker import Worker

TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and France "
    "built wooden machines that riders pushed along with their feet. Pedals arrived decades later, and by the "
    "1890s the safety bicycle, with two wheels of equal size and a chain drive, had made cycling popular across "
    "Europe and America. Today, millions of people ride to work, to school, or simply for pleasure, and cities "
    "build dedicated lanes to keep them safe. A rider turns more of the energy spent into motion than a walker "
    "does, and a well-kept bicycle can last for decades."
)
TOP1_SLACK = 0.03  # four positions of ~128: a near-tie flipped by a different summation order
KL_FACTOR, KL_ABS = 1.5, 2e-4
TOP_K = 20
DEFAULT = ("Q4_K_M",)  # the default suite's representative: K-quants (Q4_K, Q6_K) with Q5_0 and Q8_0 fallbacks
SLOW = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S")
GREEDY_TOKENS = 12
GREEDY_PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a small village,"]


@cache
def fixtures():
    """Imported on first use: it imports llama_cpp and transformers, and building a variant takes seconds."""
    from tests.fixtures import gguf_quantized

    return gguf_quantized


@cache
def token_ids() -> tuple[int, ...]:
    from shardserve.cluster.config import default_model_path

    ids = Tokenizer.from_gguf(default_model_path()).encode(TEXT)
    assert 100 <= len(ids) <= 160, len(ids)
    return tuple(ids)


def llamacpp_logits(path: str, ids: list[int]) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(path, logits_all=True, n_ctx=256, n_batch=256, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)  # [T, V]
    finally:
        llm.close()


def hf_logits(path: str, ids: list[int]) -> torch.Tensor:
    hf = fixtures().smollm2_hf_on_gguf(path)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [T, V]


def our_worker(path: str) -> Worker:
    worker = Worker(path, "cpu", "float32", None, 0, 1)
    worker.init("127.0.0.1", 0)
    worker.init_cache(16, 16)
    return worker


def loading_path(worker: Worker) -> str:
    """How our layers hold their weights, for the record (read where present, never required): per method
    class, the `layout` of any attribute that names one (a kept-quantized weight) and the tensors' dtypes."""
    seen: dict[str, int] = {}
    for module in worker.model.modules():
        method = getattr(module, "method", None)
        if method is None:
            continue
        attrs = list(vars(module).items()) + list(module.named_children())
        held = [f"{n}:{v.layout}" for n, v in attrs if isinstance(getattr(v, "layout", None), str)]
        held += [f"{n}={getattr(module, n)}" for n in ("grouped", "group", "int4") if hasattr(module, n)]
        held += [f"{n}:{t.dtype}".replace("torch.", "") for n, t in module.named_buffers(recurse=False)]
        held += [f"{n}:{t.dtype}".replace("torch.", "") for n, t in module.named_parameters(recurse=False)]
        key = f"{type(method).__name__}[{','.join(sorted(held))}]"
        seen[key] = seen.get(key, 0) + 1
    return "; ".join(f"{k} x{n}" for k, n in sorted(seen.items()))


@dataclass(frozen=True)
class Agreement:
    top1: float
    kl20: float
    kl: float

    def within(self, floor: Agreement) -> bool:
        return self.top1 >= floor.top1 - TOP1_SLACK and self.kl20 <= KL_FACTOR * floor.kl20 + KL_ABS

    def __str__(self) -> str:
        return f"top-1 {self.top1:.4f}  KL@20 {self.kl20:.2e}  KL {self.kl:.2e}"


def agreement(ref: torch.Tensor, other: torch.Tensor) -> Agreement:
    """The module docstring's figures, `ref` the reference logits [T, V], `other` the compared model's."""
    top1 = (ref.argmax(-1) == other.argmax(-1)).float().mean().item()
    lp_ref, lp_other = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_other)).sum(-1).mean().item()
    top = ref.topk(TOP_K, dim=-1).indices  # [T, 20]
    p = torch.log_softmax(ref.double().gather(-1, top), -1)  # [T, 20] renormalised over the 20
    q = torch.log_softmax(other.double().gather(-1, top), -1)
    kl20 = (p.exp() * (p - q)).sum(-1).mean().item()
    return Agreement(top1, kl20, kl)


def compare_variant(ftype: str) -> None:
    variant = fixtures().smollm2(ftype)
    ids = list(token_ids())
    t0 = time.perf_counter()
    cpp = llamacpp_logits(variant.path, ids)
    t1 = time.perf_counter()
    hf = hf_logits(variant.path, ids)
    t2 = time.perf_counter()
    worker = our_worker(variant.path)
    ours = worker.score(ids)
    t3 = time.perf_counter()
    floor, vs_cpp, vs_hf = agreement(cpp, hf), agreement(cpp, ours), agreement(hf, ours)
    print(
        f"\nSmolLM2 {ftype} over {len(ids)} positions; tensors {variant.types_text()}; quantized in "
        f"{variant.quantize_s:.1f} s; llama.cpp {t1 - t0:.1f} s, HF {t2 - t1:.1f} s, ours {t3 - t2:.1f} s\n"
        f"  HF   vs llama.cpp (floor): {floor}\n  ours vs llama.cpp:         {vs_cpp}\n"
        f"  ours vs HF:                {vs_hf}\n  our layers: {loading_path(worker)}"
    )
    assert vs_hf.within(floor), f"{ftype}: ours vs HF {vs_hf}; floor {floor}"
    assert vs_cpp.kl20 <= KL_FACTOR * floor.kl20 + KL_ABS, f"{ftype}: ours vs llama.cpp {vs_cpp}; floor {floor}"
    if vs_hf.kl20 > floor.kl20 / 2:
        assert vs_cpp.within(floor), f"{ftype}: ours vs llama.cpp {vs_cpp}; floor {floor}"


@pytest.mark.parametrize("ftype", DEFAULT)
def test_smollm2_variant_within_noise_floor(ftype: str):
    compare_variant(ftype)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", SLOW)
def test_smollm2_variant_within_noise_floor_slow(ftype: str):
    compare_variant(ftype)  # every listed type is one llama.cpp makes without an imatrix: a refusal fails


def test_every_type_is_tested_once():
    assert sorted(DEFAULT + SLOW) == sorted(fixtures().SMOLLM2_TYPES)


@pytest.mark.slow  # 50 s; TP=3 on the kept-quantized default (Q4_1) runs by default: test_tensor_parallel
def test_k_quant_tp3_greedy_equals_tp1(ray_session):
    """SmolLM2 has 9 heads / 3 KV heads, so TP=3 splits both; on Q4_K_M (Q5_0 rows of 576 = 18 blocks of 32,
    split into 6 per rank; ffn_down's Q4_K/Q6_K rows of 1536 = 6 blocks of 256, 2 per rank) TP=3's greedy tokens,
    through Ray worker actors and gloo, equal TP=1's argmax continuation (an in-process worker re-scoring the
    sequence after each token: one Ray engine instead of two).

    Tolerance: kernels that round to bf16 make TP=3's logits differ from TP=1's by rounding (measured on the
    kept-quantized path over TEXT: max |dlogit| 0.6 at logits up to 42, KL 1.2e-3; ~1e-4 dequantized fp32). So the
    sequences must agree up to the first token where TP=1's two candidates are closer than twice the largest
    TP=3-vs-TP=1 logit difference measured on TEXT in this test (a near-tie that rounding may flip); past a
    flip the continuations differ by construction. TP=3's teacher-forced logits must also be within the noise
    floor's rule of TP=1's (top-1 and KL@20 as in the module docstring, vs HF-vs-llama.cpp on this file)."""
    from shardserve import LLM, SamplingParams

    path = fixtures().smollm2("Q4_K_M").path
    tokenizer = Tokenizer.from_gguf(path)
    prompts = [tokenizer.encode(p) for p in GREEDY_PROMPTS]
    greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    ids = list(token_ids())
    with LLM(path, tp_size=3, device="cpu", kv_cache_memory_gb=0.1, cpu_threads_per_worker=1) as llm:
        tp3 = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)]
        tp3_logits = llm.score(ids)  # [T, V]
    worker = our_worker(path)
    tp1_logits = worker.score(ids)
    noise = (tp3_logits - tp1_logits).abs().max().item()
    split = agreement(tp1_logits, tp3_logits)
    floor = agreement(llamacpp_logits(path, ids), hf_logits(path, ids))
    flips = []
    for prompt, got in zip(prompts, tp3):
        seq = list(prompt)
        for token in got:
            logits = worker.score(seq)[-1]  # [V] TP=1's next-token logits
            best = int(logits.argmax())
            if token != best:
                flips.append((len(seq) - len(prompt), (logits[best] - logits[token]).item()))
                break
            seq.append(token)
    print(f"\nSmolLM2 Q4_K_M TP=3 vs TP=1: teacher-forced {split}, max |dlogit| {noise:.3f}; greedy flips "
          f"(step, TP=1's logit gap) {flips}; floor {floor}\n  our layers: {loading_path(worker)}")
    assert split.within(floor), f"TP=3 vs TP=1 {split}; floor {floor}"
    assert all(gap <= 2 * noise for _, gap in flips), f"flips {flips} at gaps above 2 x {noise:.3f}"
