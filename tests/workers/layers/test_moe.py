"""MoE: the device ops vs per-token references, SparseMoeBlock vs HF's sparse block under every TP/EP split,
whole models (safetensors and GGUF F16/Q8_0) vs HF transformers, and multi-process TP/EP runs over gloo.

References: HF transformers with `experts_implementation="eager"` (its per-expert loop, not the grouped_mm
our CPU op also uses); for GGUF, the same HF model with every weight replaced by gguf-py's dequantization
of the file. Tolerances (fp32 throughout): ops 1e-5, one block 1e-5, whole-model log-probs 1e-4 (the
observed differences are ~1e-6: summation order only); top-1 agreement >= 0.999.
"""

from __future__ import annotations

import dataclasses
import importlib
import socket
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardserve.workers.device.base import TorchOps
from shardserve.workers.distributed import TPGroup, init_tp_group
from shardserve.workers.layers.moe import SparseMoeBlock
from shardserve.workers.loader import CheckpointError, open_checkpoint
from shardserve.workers.model_runner import ModelRunner
from shardserve.workers.models import model_class
from shardserve.workers.quant import detect
from shardserve.workers.quant.unquantized import UnquantizedMoEMethod
from shardserve.workers.step import SeqStep, StepPlan
from shardserve.workers.worker import Worker

OPS = TorchOps()
BLOCK = 16
LOGPROB_ATOL = 1e-4
SEQ_LENS, PREFILL = (16, 11, 20), 8  # prefill 8 tokens in one step, then one token per step, batched


@cache
def fixtures() -> ModuleType:
    """tests/fixtures/moe_models.py, imported on first use: spawned rank processes, which import this module,
    never need it (nor the transformers import it brings)."""
    return importlib.import_module("tests.fixtures.moe_models")


@cache
def hf_reference(name: str, gguf_type: str | None = None):
    fx = fixtures()
    model = fx.hf_on_gguf_weights(name, gguf_type) if gguf_type else fx.load_hf(name)
    model.set_experts_implementation("eager")
    return model


# ---- device ops vs per-token references -----------------------------------------------------------------
def test_moe_init_routing_sorts_rows_by_expert():
    torch.manual_seed(0)
    T, k, E, H = 13, 3, 5, 4
    x = torch.randn(T, H)
    ids = torch.randint(0, E, (T, k))
    expanded_x, row_idx, counts = OPS.moe_init_routing(x, ids, E)
    # reference: rows (t, j) ordered by (expert, flat row t*k+j)
    order = sorted(range(T * k), key=lambda r: (int(ids.view(-1)[r]), r))
    assert torch.equal(expanded_x, torch.stack([x[r // k] for r in order]))
    assert row_idx.tolist() == [order.index(r) for r in range(T * k)]
    assert counts.tolist() == [int((ids == e).sum()) for e in range(E)]


@pytest.mark.parametrize("kernel_layout", [False, True], ids=["contiguous", "kernel-layout"])
def test_grouped_matmul_matches_per_row(kernel_layout: bool):
    torch.manual_seed(0)
    E, N, K = 6, 24, 40
    counts = torch.tensor([3, 0, 5, 1, 0, 4])
    M = int(counts.sum())
    x, w = torch.randn(M, K), torch.randn(E, N, K)
    if kernel_layout:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    group = torch.repeat_interleave(torch.arange(E), counts)  # [M] expert of each row
    ref = torch.stack([w[group[i]] @ x[i] for i in range(M)])
    torch.testing.assert_close(OPS.grouped_matmul(x, w, counts), ref, atol=1e-5, rtol=1e-5)
    # rows past the last group (expert parallelism's idle rows) leave the grouped rows untouched
    padded = OPS.grouped_matmul(torch.cat([x, torch.randn(3, K)]), w, counts)
    torch.testing.assert_close(padded[:M], ref, atol=1e-5, rtol=1e-5)


def test_moe_finalize_routing_matches_per_token():
    torch.manual_seed(0)
    T, k, H = 7, 2, 8
    y, weights, shared = torch.randn(T * k, H), torch.rand(T, k), torch.randn(T, H)
    row_idx = torch.randperm(T * k)
    ref = torch.stack([sum(weights[t, j] * y[row_idx[t * k + j]] for j in range(k)) for t in range(T)])
    torch.testing.assert_close(OPS.moe_finalize_routing(y, weights, row_idx, None), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(OPS.moe_finalize_routing(y, weights, row_idx, shared), ref + shared)


def test_swiglu():
    x = torch.randn(5, 12)
    ref = x[:, :6] / (1 + torch.exp(-x[:, :6])) * x[:, 6:]
    torch.testing.assert_close(OPS.swiglu(x), ref)


# ---- SparseMoeBlock vs HF's block: every rank's partial output, summed, is the whole -------------------------
@dataclasses.dataclass(frozen=True)
class Unreduced(TPGroup):
    """One rank of a TP group whose all-reduce the test performs itself, by summing every rank's output."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def rank_blocks(path: str, layer: int, size: int, ep: bool) -> list[SparseMoeBlock]:
    source, cfg = open_checkpoint(path)
    cfg = dataclasses.replace(cfg, enable_expert_parallel=ep)
    blocks = []
    for rank in range(size):
        block = SparseMoeBlock(f"model.layers.{layer}.mlp", cfg, detect(path), Unreduced(rank, size), OPS, torch.float32)
        block.load(source)
        blocks.append(block)
    return blocks


def hidden_states(T: int, H: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(T, H)  # unit scale, like the post-attention RMSNorm output


SPLITS = [(1, False), (2, False), (4, False), (2, True), (4, True)]
SPLIT_IDS = ["tp1", "tp2", "tp4", "ep2", "ep4"]


@pytest.mark.parametrize("size,ep", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_block_matches_hf(name: str, size: int, ep: bool):
    hf = hf_reference(name)
    x = hidden_states(37, hf.config.hidden_size)
    blocks = rank_blocks(fixtures().safetensors_model(name), 0, size, ep)
    with torch.no_grad():
        ref = hf.model.layers[0].mlp(x.unsqueeze(0))[0]
        ours = sum(b(x, True) for b in blocks)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    E, inter = hf.config.num_experts, hf.config.moe_intermediate_size
    e_local, i_local = (E // size, inter) if ep else (E, inter // size)
    assert blocks[-1].w13.method.reference_weight(blocks[-1].w13).shape == (e_local, 2 * i_local, hf.config.hidden_size)
    assert blocks[-1].w2.method.reference_weight(blocks[-1].w2).shape == (e_local, hf.config.hidden_size, i_local)


def test_block_bf16_matches_hf_bf16():
    """The same block in bf16 (grouped_mm, top-k weights and combine in bf16); tolerance: a few bf16 ulps of
    outputs of magnitude ~0.2 (observed 5e-4)."""
    hf = fixtures().load_hf("qwen2_moe").to(torch.bfloat16)
    hf.set_experts_implementation("eager")
    x = hidden_states(33, hf.config.hidden_size).to(torch.bfloat16)
    path = fixtures().safetensors_model("qwen2_moe")
    source, cfg = open_checkpoint(path)
    block = SparseMoeBlock("model.layers.0.mlp", cfg, detect(path), TPGroup(), OPS, torch.bfloat16)
    block.load(source)
    with torch.no_grad():
        ours, ref = block(x, True), hf.model.layers[0].mlp(x.unsqueeze(0))[0]
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize(
    "gguf_type,size,ep", [("F16", 2, False), ("F16", 4, False), ("F16", 4, True), ("Q8_0", 2, True)]
)
def test_gguf_block_splits_match_hf(gguf_type: str, size: int, ep: bool):
    """Stacked GGUF experts sliced per rank (I axis under TP, expert axis under EP) vs HF on the same values."""
    hf = hf_reference("qwen2_moe", gguf_type)
    x = hidden_states(29, hf.config.hidden_size)
    blocks = rank_blocks(fixtures().gguf_model("qwen2_moe", gguf_type), 1, size, ep)
    with torch.no_grad():
        ref = hf.model.layers[1].mlp(x.unsqueeze(0))[0]
        ours = sum(b(x, True) for b in blocks)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_gguf_tp_split_inside_a_quant_block_fails_loudly():
    """Q8_0 down_exps [E, H, I=32]: TP 2 would cut its 32-wide blocks; expert parallelism is the way out."""
    with pytest.raises(CheckpointError, match=r"experts\.down_proj.*Q8_0 blocks of 32.*expert parallelism"):
        rank_blocks(fixtures().gguf_model("qwen2_moe", "Q8_0"), 0, 2, ep=False)


def test_per_expert_method_names_what_it_looked_for():
    source, cfg = open_checkpoint(fixtures().gguf_model("qwen3_moe", "F16"))
    block = SparseMoeBlock("model.layers.0.mlp", cfg, detect(source.path), TPGroup(), OPS, torch.float32)
    block.w13.method = UnquantizedMoEMethod()  # per-expert names, which a GGUF file does not have
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        block.load(source)


# ---- whole models vs HF, through the step protocol --------------------------------------------------------
def sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in SEQ_LENS]


def teacher_forced(execute, seqs: list[list[int]], vocab: int) -> list[torch.Tensor] | None:
    """Log-softmax rows [len, V] of every position of every sequence (None off rank 0): the first PREFILL
    tokens in one step with prompt_logprobs, then one token per step for all sequences at once."""
    nb = -(-max(map(len, seqs)) // BLOCK)
    tables = [list(range(b * nb, (b + 1) * nb)) for b in range(len(seqs))]
    rows = [torch.full((len(s), vocab), float("nan")) for s in seqs]
    steps = [
        SeqStep(b, s[:PREFILL], 0, tables[b], True, logprobs=vocab, prompt_logprobs=vocab, prompt_next_ids=s[1:PREFILL] + [None])
        for b, s in enumerate(seqs)
    ]
    result = execute(StepPlan(steps))
    if result is not None:
        for b, r in enumerate(result.results):
            for t, entry in enumerate(r.prompt_logprobs[:-1]):
                _fill(rows[b][t], entry[1])
            _fill(rows[b][PREFILL - 1], r.top_logprobs)
    for p in range(PREFILL, max(map(len, seqs))):
        live = [b for b, s in enumerate(seqs) if len(s) > p]
        result = execute(StepPlan([SeqStep(b, [seqs[b][p]], p, tables[b], True, logprobs=vocab) for b in live]))
        for b, r in zip(live, result.results if result is not None else []):
            _fill(rows[b][p], r.top_logprobs)
    return rows if result is not None else None


def _fill(row: torch.Tensor, pairs: list[tuple[int, float]]) -> None:
    for token, logprob in pairs:
        row[token] = logprob


def hf_logprobs(hf, seqs: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(hf(torch.tensor([s])).logits[0].float(), dim=-1) for s in seqs]


def in_process_worker(path: str, ops: TorchOps | None = None) -> Worker:
    """`ops`: an op table instead of the CPU's (TorchOps: GGUF kept quantized in the exact reference layout)."""
    worker = Worker(path, "cpu", "float32", None, rank=0, tp_size=1)
    if ops is not None:
        worker.backend = dataclasses.replace(worker.backend, ops=ops)
    worker.init("127.0.0.1", 0)
    worker.init_cache(num_blocks=len(SEQ_LENS) * 2, block_size=BLOCK)
    return worker


def assert_matches(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    ours_all, ref_all = torch.cat(ours), torch.cat(ref)
    assert not ours_all.isnan().any(), "a position's log-probs were not returned"
    top1 = (ours_all.argmax(-1) == ref_all.argmax(-1)).float().mean().item()
    max_diff = (ours_all - ref_all).abs().max().item()
    assert top1 >= 0.999 and max_diff <= LOGPROB_ATOL, f"top-1 agreement {top1:.4f}, max |diff| {max_diff:.2e}"


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "qwen2_moe_mixed"])
def test_model_matches_hf(name: str):
    hf = hf_reference(name)
    seqs = sequences(hf.config.vocab_size)
    ours = teacher_forced(in_process_worker(fixtures().safetensors_model(name)).execute, seqs, hf.config.vocab_size)
    assert_matches(ours, hf_logprobs(hf, seqs))


@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0"])
@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_gguf_model_matches_hf_on_dequantized_weights(name: str, gguf_type: str):
    """Q8_0 stays quantized (experts stacked [E, N, K] int8 + scales) in the exact reference layout, as on CUDA;
    the CPU kernels' bf16 rounding is bounded in tests/workers/quant/test_gguf_groups.py."""
    hf = hf_reference(name, gguf_type)
    seqs = sequences(hf.config.vocab_size)
    worker = in_process_worker(fixtures().gguf_model(name, gguf_type), TorchOps())
    assert worker.cfg.norm_topk_prob == hf.config.norm_topk_prob
    experts = worker.model.layers[0].mlp.w13
    assert experts.grouped == (gguf_type == "Q8_0")
    assert_matches(teacher_forced(worker.execute, seqs, hf.config.vocab_size), hf_logprobs(hf, seqs))


# ---- several processes over gloo: rank 0's log-probs under TP / EP equal TP=1's ------------------------------
def _rank_main(rank: int, size: int, port: int, path: str, ep: bool, seqs: list[list[int]], out: str) -> None:
    torch.set_num_threads(1)
    tp = init_tp_group("gloo", rank, size, "127.0.0.1", port)
    source, cfg = open_checkpoint(path)
    cfg = dataclasses.replace(cfg, enable_expert_parallel=ep)
    model = model_class(cfg.architecture)(cfg, detect(path), tp, OPS, torch.float32)
    model.load(source)
    shape = (len(seqs) * 2, BLOCK, model.kv_heads_local(), cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
    runner = ModelRunner(model, caches, BLOCK, torch.device("cpu"))
    rows = teacher_forced(runner.execute, seqs, cfg.vocab_size)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def run_ranks(path: str, size: int, ep: bool, seqs: list[list[int]], tmp_path: Path) -> list[torch.Tensor]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"rank0-{size}-{ep}.pt")
    mp.spawn(_rank_main, args=(size, port, path, ep, seqs, out), nprocs=size, join=True)
    return torch.load(out)


@pytest.mark.parametrize(
    "size,ep",
    [(2, False), (2, True), pytest.param(4, False, marks=pytest.mark.slow), pytest.param(4, True, marks=pytest.mark.slow)],
    ids=["tp2", "ep2", "tp4", "ep4"],
)
def test_ranks_match_tp1(size: int, ep: bool, tmp_path: Path):
    path = fixtures().safetensors_model("qwen2_moe")
    _, cfg = open_checkpoint(path)
    seqs = sequences(cfg.vocab_size)
    tp1 = teacher_forced(in_process_worker(path).execute, seqs, cfg.vocab_size)
    ours = run_ranks(path, size, ep, seqs, tmp_path)
    for a, b in zip(ours, tp1):
        torch.testing.assert_close(a, b, atol=LOGPROB_ATOL, rtol=0)
    assert_matches(ours, hf_logprobs(hf_reference("qwen2_moe"), seqs))


# ---- through the cluster: Ray worker actors, the router's step plans --------------------------------------
@pytest.mark.parametrize(
    "size,ep",
    [(2, False), (2, True), pytest.param(4, False, marks=pytest.mark.slow), pytest.param(4, True, marks=pytest.mark.slow)],
    ids=["tp2", "ep2", "tp4", "ep4"],
)
def test_llm_matches_hf(ray_session, size: int, ep: bool):
    """TP (each expert split) and EP (experts partitioned) through Ray worker actors and gloo."""
    from shardserve import LLM, SamplingParams

    hf = hf_reference("qwen2_moe")
    prompt = sequences(hf.config.vocab_size)[0]
    llm = LLM(fixtures().safetensors_model("qwen2_moe"), tp_size=size, device="cpu", kv_cache_memory_gb=0.1,
              cpu_threads_per_worker=1, enable_expert_parallel=ep)
    try:
        logits = llm.score(prompt)  # [len, V] teacher-forced
        greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        tokens = llm.generate([{"prompt_token_ids": prompt}], greedy)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
        ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    assert (logits - ref).abs().max().item() <= LOGPROB_ATOL
    assert list(tokens) == ref_tokens.tolist()
