"""Every tensor a model holds moves with `model.to(device)`; a step's forward creates nothing off that device.

The device is `meta` (shape, dtype and device, no storage): this machine has no second device. The model
is built and moved by Worker.init itself, on a CPU backend renamed `meta`. A tensor kept as a plain module
attribute is not moved by `.to()` and is not among `named_buffers()`, so the check walks every attribute
of every module and of the objects they hold (quant methods, specs, the op table). The forward runs under
NoDeviceMixing: meta kernels check devices for some ops only (linear and embedding take a CPU weight),
while CUDA and the NPU refuse every op that mixes a CPU tensor with theirs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from shardserve.workers.device.base import TorchOps
from shardserve.workers.sampler import _filtered_probs
from shardserve.workers.step import SeqStep
from shardserve.workers.worker import Worker
from tests.fixtures.tiny_models import make_tiny

META = torch.device("meta")
BLOCK = 16


class NoDeviceMixing(TorchDispatchMode):
    """Raises on any op whose tensors lie on more than one device, as an accelerator's kernels do. Explicit
    copies (`.to()`, `copy_`) are the sanctioned crossings; 0-d CPU tensors pass as scalars, as on CUDA."""

    COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.COPIES:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
            devices = sorted({str(t.device) for t in tensors})
            if len(devices) > 1:
                shapes = [(str(t.device), tuple(t.shape)) for t in tensors]
                raise RuntimeError(f"{func} mixes devices {devices}: {shapes}")
        return func(*args, **kwargs)


def _model_path(name: str, cache_dir: str, smollm2_path: str) -> str:
    if name == "smollm2":
        return smollm2_path  # GGUF Q4_1 through the GGUF linear method; tied embeddings
    if name.endswith("_moe"):
        return importlib.import_module("tests.fixtures.moe_models").safetensors_model(name)
    return make_tiny(name, cache_dir)


# dense: llama, qwen2 (q/k/v bias), qwen3 (q/k norm), SmolLM2 (GGUF, tied LM head); MoE: qwen2_moe (shared
# expert, its gate, bias), qwen3_moe. MoE runs in bf16: the meta grouped_mm, like CUDA's, takes bf16 only.
MODELS = {
    "llama": (torch.float32, TorchOps()),
    "qwen2": (torch.float32, TorchOps()),
    "qwen3": (torch.float32, TorchOps()),
    "smollm2": (torch.float32, TorchOps()),
    "qwen2_moe": (torch.bfloat16, TorchOps()),
    "qwen3_moe": (torch.bfloat16, TorchOps()),
}


@pytest.fixture(params=list(MODELS))
def meta_worker(request, cache_dir, smollm2_path) -> Worker:
    """Loaded on the CPU and moved to meta by Worker.init itself; its KV cache on meta."""
    dtype, ops = MODELS[request.param]
    path = _model_path(request.param, cache_dir, smollm2_path)
    worker = Worker(path, "cpu", "float32", None, rank=0, tp_size=1)
    worker.backend = dataclasses.replace(worker.backend, name="meta", ops=ops)
    worker.dtype = dtype
    worker.init("127.0.0.1", 0)
    worker.init_cache(num_blocks=8, block_size=BLOCK)
    return worker


def held_tensors(
    obj, path: str = "model", seen: set[int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor reachable from `obj` through attributes, dicts, lists and tuples,
    descending into modules and into shardserve's own objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            # a module's registries read as attributes: embed_tokens.weight, not embed_tokens._buffers.weight
            inner = path if key in ("_parameters", "_buffers", "_modules") else f"{path}.{key}"
            yield from held_tensors(value, inner, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield from held_tensors(value, f"{path}[{i}]", seen)
    elif isinstance(obj, nn.Module) or type(obj).__module__.startswith("shardserve."):
        yield from held_tensors(getattr(obj, "__dict__", {}), path, seen)


def test_every_tensor_moves_with_the_model(meta_worker):
    model = meta_worker.model
    found = dict(held_tensors(model))
    assert len(found) >= len(dict(model.named_buffers())) > 0
    left_behind = sorted(f"{path} ({t.device})" for path, t in found.items() if t.device != META)
    assert not left_behind, f"{len(left_behind)} tensors not moved by .to(meta): {left_behind}"


def test_tied_lm_head_shares_the_moved_embedding(cache_dir, smollm2_path):
    """`.to()` copies each buffer once per module that holds it: a head that kept its own reference to the
    embedding's tensor would get a second copy on the device (twice the memory, and no longer tied). Float
    weights (--gguf-dequantize): kept quantized, the CPU head holds its own kernel layout by design."""
    worker = Worker(smollm2_path, "cpu", "float32", None, rank=0, tp_size=1, gguf_dequantize=True)
    worker.backend = dataclasses.replace(worker.backend, name="meta")
    worker.init("127.0.0.1", 0)
    model = worker.model
    assert model.cfg.tie_word_embeddings
    embedding = model.embed_tokens.weight
    assert embedding.device == META
    same_shape = {id(t) for _, t in held_tensors(model) if t.shape == embedding.shape}
    assert same_shape == {id(embedding)}, "the tied LM head holds a second [vocab, hidden] tensor"


def test_step_forward_stays_on_the_device(meta_worker):
    """A prefill chunk and a decode step batched through the runner's device half of a step: metadata,
    every layer's forward, the logits; no op may meet a CPU tensor on the way."""
    vocab = meta_worker.cfg.vocab_size
    seqs = [
        SeqStep(0, [3, 5, 7, 9, 11], 0, [0], True, prompt_logprobs=1, prompt_next_ids=[5, 7, 9, 11, None]),
        SeqStep(1, [13], 20, [1, 2], True),
    ]
    runner = meta_worker.runner
    rows, _ = runner._logit_rows(seqs)
    with NoDeviceMixing():
        logits = runner.logits(seqs, rows)
    assert logits.device == META and logits.shape == (6, vocab) and logits.dtype == torch.float32


def test_sampling_filters_stay_on_the_device():
    """Temperature, top-k, top-p and min-p applied to logits on meta (the runner samples on the host today,
    so this keeps the sampler usable where the logits are)."""
    seqs = [SeqStep(i, [1], 0, [0], True, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05) for i in range(2)]
    probs = _filtered_probs(torch.randn(2, 50, device=META), seqs)
    assert probs.device == META and probs.shape == (2, 50)
