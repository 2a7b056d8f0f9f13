"""Our decoder vs HF transformers, teacher-forced, fp32: the real SmolLM2 GGUF and tiny llama/qwen2/qwen3."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardserve.workers.worker import Worker
from tests.fixtures.tiny_models import make_tiny

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre, and its cafes. "
    "Many tourists visit every year to see the sights and taste the food.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on its surface while "
    "Michael Collins orbited above. The mission returned safely to Earth on July 24.",
    "Photosynthesis converts light energy into chemical energy. Plants absorb carbon dioxide and water, "
    "and with sunlight they produce glucose and oxygen. This process sustains most life on Earth.",
    "Q: What is 12 times 12?\nA: 144.\nQ: What is the square root of 81?\nA: 9.\nQ: Name three primary "
    "colors.\nA: Red, yellow and blue.",
]


def _worker(path: str, gguf_dequantize: bool = False) -> Worker:
    w = Worker(path, "cpu", "float32", None, 0, 1, gguf_dequantize=gguf_dequantize)
    w.init("127.0.0.1", 0)
    w.init_cache(8, 16)
    return w


def _compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours)) over positions."""
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    lp_ref, lp_ours = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_ours)).sum(-1).mean().item()
    return top1, kl


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path) -> tuple[list[list[int]], torch.Tensor]:
    """TEXTS' token ids and HF's fp32 logits over all their positions [>= 200, vocab], on the dequantized GGUF."""
    from shardserve.workers.loader.tokenizer import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    ).eval()
    tok = Tokenizer.from_gguf(smollm2_path)
    ids = [tok.encode(text) for text in TEXTS]
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([i])).logits[0].float() for i in ids])
    assert ref.shape[0] >= 200
    return ids, ref


def test_smollm2_gguf_matches_hf_transformers(smollm2_path, smollm2_hf):
    """Dequantized at load (--gguf-dequantize), as HF does. Tolerance: top-1 agreement >= 0.99 and mean KL <= 1e-3
    over >= 200 positions (issue 3)."""
    ids, ref = smollm2_hf
    worker = _worker(smollm2_path, gguf_dequantize=True)
    top1, kl = _compare(torch.cat([worker.score(i) for i in ids]), ref)
    assert top1 >= 0.99, top1
    assert kl <= 1e-3, kl
    print(f"SmolLM2 Q4_1 vs HF over {ref.shape[0]} positions: top-1 {top1:.4f}, mean KL {kl:.2e}")


def test_smollm2_kept_quantized_close_to_hf(smollm2_path, smollm2_hf):
    """The default: weights kept quantized, the CPU's gq kernel holding activations as int16 per 32 values.
    Measured: top-1 1.0, mean KL 9.1e-8 (the 4-bit Q4_1 layers and the tied 8-bit Q8_0 head, held once); ATen's
    bf16 int4 kernel gave 0.987 and 8.2e-4, and one int8 plane for x (llama.cpp's Q8_0) 0.969 and 2.9e-3.
    Tolerance: the dequantized path's, top-1 >= 0.99 and mean KL <= 1e-4, far inside the noise floor of HF vs
    llama.cpp on this file (top-1 0.974, mean KL 0.0036, issue 16)."""
    ids, ref = smollm2_hf
    worker = _worker(smollm2_path)
    assert all(layer.mlp.down.grouped for layer in worker.model.layers)
    # the tied Q8_0 matrix held once, in the kernel's layout: the embedding reads its rows, the head multiplies it
    assert worker.model.embed_tokens.qweight.layout == "gq" and worker.model.lm_head.qweight is None
    assert worker.model.embed_tokens.qweight.bits == 8
    top1, kl = _compare(torch.cat([worker.score(i) for i in ids]), ref)
    assert top1 >= 0.99, top1
    assert kl <= 1e-4, kl
    print(f"SmolLM2 Q4_1 kept quantized (CPU gq kernel) vs HF over {ref.shape[0]} positions: top-1 {top1:.4f}, mean KL {kl:.2e}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_safetensors_match_hf(arch, cache_dir):
    """Unquantized safetensors: logits within 1e-4 of HF's (fp32, same weights)."""
    path = make_tiny(arch, cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    worker = _worker(path)
    ids = list(range(3, 3 + 60))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = worker.score(ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_sharded_safetensors_index_loads(cache_dir, tmp_path):
    """A checkpoint split over several files with model.safetensors.index.json loads to the same logits."""
    import shutil

    path = make_tiny("llama", cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(path, f), tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(_worker(str(tmp_path)).score(ids), ref, atol=1e-4, rtol=1e-4)
