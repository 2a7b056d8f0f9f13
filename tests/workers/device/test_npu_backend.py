"""The npu backend (NpuBackend + NpuOps) through the torch_npu EMULATION: device choice, Ray NPU binding, and the
real SmolLM2 end to end against the cpu backend.

These tests run shardserve's NPU code path against tests/npu_emulation, an emulation of torch_npu's DOCUMENTED
op semantics on CPU. They check our call plumbing, not Ascend hardware, its kernels, HCCL or its memory limits.
Tolerance: float32 logits within 1e-3 of the cpu backend's (observed ~1e-5: summation order only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardserve.workers.device import TorchOps, get_backend, resolve_device
from shardserve.workers.loader.gguf_source import find_gguf_file
from shardserve.workers.loader.tokenizer import Tokenizer
from shardserve.workers.step import SeqStep
from shardserve.workers.worker import Worker

LOGIT_ATOL = 1e-3
BLOCK = 16
TEXT = (
    "The Ascend backend keeps the model on the accelerator: the key and value caches live in blocks of sixteen "
    "tokens, attention reads them through a block table, and every rank adds its partial sums together."
)


def test_npu_emulated_backend_identity(npu_emulation):
    backend = get_backend("npu")
    assert (backend.name, backend.ray_resource) == ("npu", "NPU")
    assert backend.dist_backend == "gloo"  # only because the emulation keeps tensors on CPU
    assert backend.setup(0) == torch.device("cpu") and torch.npu.current_device() == 0
    backend.set_memory_fraction(0.5)
    assert torch.npu.memory_fraction() == 0.5
    total = npu_emulation.npu.TOTAL_MEMORY
    assert backend.memory_info() == (total, total)
    assert backend.kv_cache_budget(0.25, cpu_gb=1.0) == total // 4  # SGLang's rule, from the NPU's memory


def test_npu_emulated_real_torch_npu_means_hccl(npu_emulation, monkeypatch):
    monkeypatch.delattr(npu_emulation, "EMULATED")  # real torch_npu has no such flag
    assert get_backend("npu").dist_backend == "hccl"


def test_npu_emulated_auto_prefers_a_present_npu(npu_emulation):
    assert resolve_device("auto") == "npu"
    assert get_backend("auto").name == "npu"


def test_npu_emulated_auto_skips_torch_npu_without_devices(npu_emulation, monkeypatch):
    monkeypatch.setattr(npu_emulation.npu, "DEVICE_COUNT", 0)
    assert get_backend("auto").name == "cpu"


def test_auto_is_cpu_without_torch_npu(no_torch_npu):
    from shardserve.workers.device import npu

    assert not npu.available()
    assert get_backend("auto").name == "cpu"


def test_npu_emulated_setup_binds_the_npus_ray_assigned(npu_emulation, monkeypatch):
    """Where Ray did not export ASCEND_RT_VISIBLE_DEVICES, the actor's assigned NPU ids become its visible set."""
    import ray

    class Context:
        def get_accelerator_ids(self):
            return {"GPU": [], "NPU": ["5", "6"]}

    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")  # recorded, so that teardown removes what setup sets
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    get_backend("npu").setup(0)
    assert os.environ["ASCEND_RT_VISIBLE_DEVICES"] == "5,6"
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1")  # Ray's own value wins
    get_backend("npu").setup(0)
    assert os.environ["ASCEND_RT_VISIBLE_DEVICES"] == "1"


# ---- SmolLM2 end to end, in process -------------------------------------------------------------------------
def prompts(model_path: str) -> list[list[int]]:
    ids = Tokenizer.from_gguf(find_gguf_file(model_path)).encode(TEXT)
    assert len(ids) >= 36
    return [ids, ids[5:38][::-1]]  # 2 sequences of different lengths in one batch


def teacher_forced_logits(worker: Worker, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len, V] of every position: one step prefills 20 / 16 tokens, the next a 12-token chunk of the first
    sequence next to a decode of the second, two more decode steps, then each sequence's rest as one chunk;
    block tables are out of order."""
    tables = [[6, 1, 4], [3, 0, 5]]
    bounds = [[0, 20, 32, 33, 34, len(seqs[0])], [0, 16, 17, 18, 19, len(seqs[1])]]
    out: list[list[torch.Tensor]] = [[], []]
    runner = worker.runner
    for step in range(max(map(len, bounds)) - 1):
        live = [b for b in range(2) if step + 1 < len(bounds[b])]
        plan = [SeqStep(b, seqs[b][bounds[b][step] : bounds[b][step + 1]], bounds[b][step], tables[b], True) for b in live]
        ids, positions, meta = runner._prepare(plan)
        with torch.inference_mode():
            logits = worker.model.compute_logits(worker.model(ids, positions, runner.kv_caches, meta))
        for s, part in zip(live, logits.split([len(p.token_ids) for p in plan])):
            out[s].append(part)
    return [torch.cat(parts) for parts in out]


def loaded_worker(model_path: str, device: str) -> Worker:
    """On cpu with the plain-torch op table: GGUF kept quantized in the exact reference layout (the CPU's int4
    kernel rounds to bf16; the NPU table is checked against the reference)."""
    worker = Worker(model_path, device, "float32", None, 0, 1)
    if device == "cpu":
        worker.backend = dataclasses.replace(worker.backend, ops=TorchOps())
    worker.init("127.0.0.1", 0, threads=2)
    worker.init_cache(num_blocks=8, block_size=BLOCK)
    return worker


def test_npu_emulated_smollm2_logits_match_cpu_backend(npu_emulation, smollm2_path):
    seqs = prompts(smollm2_path)
    npu_worker = loaded_worker(smollm2_path, "npu")
    assert type(npu_worker.backend.ops).__name__ == "NpuOps"
    ours = teacher_forced_logits(npu_worker, seqs)
    ref = teacher_forced_logits(loaded_worker(smollm2_path, "cpu"), seqs)
    for a, b, s in zip(ours, ref, seqs):
        assert a.shape == (len(s), b.shape[1])
        torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def moe_fixture(name: str) -> str:
    """A tiny random Qwen-MoE checkpoint made by transformers (tests/fixtures/moe_models.py, cached)."""
    module = sys.modules.get("moe_models")  # tests/workers/layers/test_moe.py loads it under this name too
    if module is None:
        path = Path(__file__).parents[2] / "fixtures" / "moe_models.py"
        spec = importlib.util.spec_from_file_location("moe_models", path)
        module = sys.modules["moe_models"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.safetensors_model(name)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_npu_emulated_moe_model_logits_match_cpu_backend(npu_emulation, name):
    """MoE layers through init_routing_v2 / grouped_matmul / finalize_routing, qwen3's per-head q/k norm, and
    head_dim 16 (rotary through npu_rotary_mul): logits vs the cpu backend."""
    path = moe_fixture(name)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (41, 33)]
    ours = teacher_forced_logits(loaded_worker(path, "npu"), seqs)
    ref = teacher_forced_logits(loaded_worker(path, "cpu"), seqs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=0)


# ---- TP = 3 through the cluster: Ray workers import the emulation through runtime_env ----------------------
TP3_SCRIPT = r"""
import json, os, sys
import ray
from shardserve import LLM, SamplingParams

emulation, model, prompt, tp = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
env = {"PYTHONPATH": os.pathsep.join(p for p in (emulation, os.environ.get("PYTHONPATH")) if p)}
ray.init(address="local", num_cpus=8, resources={"NPU": 3}, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": env})  # "local": a fresh Ray even where the test session runs one

@ray.remote(resources={"NPU": 1}, num_cpus=0,
            runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "1"}})
def bind():
    from shardserve.workers.device import get_backend
    before = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    get_backend("npu").setup(0)
    return before, os.environ.get("ASCEND_RT_VISIBLE_DEVICES"), ray.get_runtime_context().get_accelerator_ids()["NPU"]

params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=1)
result = {"bind": ray.get(bind.remote())}
for name, kwargs in (("npu", dict(tp_size=tp, device="npu")), ("cpu", dict(tp_size=1, device="cpu"))):
    # KV cache: 0.2 of the emulated card's 512 MiB on each npu rank (allocated in host RAM), 0.1 GiB on cpu
    llm = LLM(model, dtype="float32", kv_cache_memory_gb=0.1, mem_fraction_static=0.2, cpu_threads_per_worker=1,
              **kwargs)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0]
    lps = [None if p is None else p[t].logprob for p, t in zip(out.prompt_logprobs, out.prompt_token_ids)]
    result[name] = {"tokens": out.outputs[0].token_ids, "prompt_logprobs": lps}
    llm.shutdown()
print("RESULT " + json.dumps(result))
"""


def _npu_vs_cpu_on_ray(model: str, prompt: list[int], tp: int, emulation_dir: str) -> None:
    """LLM(tp_size=tp, device="npu") on a fresh Ray (in a subprocess) whose every worker has the emulation on its
    PYTHONPATH through the job's runtime_env; HCCL is replaced by gloo there. Against LLM(tp_size=1, cpu)."""
    run = subprocess.run(
        [sys.executable, "-c", TP3_SCRIPT, emulation_dir, model, json.dumps(prompt), str(tp)],
        capture_output=True, text=True, timeout=540,
        env={k: v for k, v in os.environ.items() if k not in ("ASCEND_RT_VISIBLE_DEVICES", "RAY_ADDRESS")},
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    before, after, ids = result["bind"]
    assert before is None and after == ",".join(ids)  # Ray told not to set it: our fallback did
    npu, cpu = result["npu"], result["cpu"]
    assert npu["tokens"] == cpu["tokens"]
    assert len(npu["prompt_logprobs"]) == len(prompt) >= 32
    for a, b in zip(npu["prompt_logprobs"][1:], cpu["prompt_logprobs"][1:]):
        assert abs(a - b) <= LOGIT_ATOL, (a, b)


@pytest.mark.slow
def test_npu_emulated_smollm2_tp3_on_ray_matches_cpu(smollm2_path, npu_emulation_dir):
    _npu_vs_cpu_on_ray(smollm2_path, prompts(smollm2_path)[0], 3, npu_emulation_dir)


def test_npu_emulated_moe_tp2_on_ray_matches_cpu(npu_emulation_dir):
    """The MoE path (init_routing_v2, grouped_matmul, finalize_routing) split over 2 emulated NPU ranks."""
    g = torch.Generator().manual_seed(5)
    _npu_vs_cpu_on_ray(moe_fixture("qwen2_moe"), torch.randint(0, 256, (40,), generator=g).tolist(), 2, npu_emulation_dir)
