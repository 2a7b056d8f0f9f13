"""The sampler against direct formulas: greedy, top-k, top-p, min-p filtering, seeded reproducibility."""

from __future__ import annotations

import torch

from shardserve.workers.sampler import _filtered_probs, sample, top_logprobs
from shardserve.workers.step import SeqStep


def _seq(**kw) -> SeqStep:
    return SeqStep(seq_id=0, token_ids=[1], start_pos=0, block_table=[0], sample=True, **kw)


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = torch.randn(3, 50)
    ids, chosen_lp, rows = sample(logits, [_seq(temperature=0.0)] * 3)
    assert ids == logits.argmax(-1).tolist()
    assert rows is None  # nobody asked for top logprobs: no full log-softmax
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(torch.tensor(chosen_lp), full[torch.arange(3), ids])
    _, _, rows = sample(logits, [_seq(temperature=0.0), _seq(temperature=0.0, logprobs=2), _seq(temperature=0.0)])
    assert torch.allclose(rows, full)


def test_temperature_only_rows_skip_the_filter_and_keep_its_distribution():
    """Temperature alone (top-k, top-p, min-p off) draws from logits / T, not the filter's sort: seeded draws equal
    to the filter's path (a no-op min-p sends a row through it), whose probabilities are softmax(logits / T)."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    V = logits.shape[-1]
    plain = [sample(logits[:1], [_seq(temperature=0.8, seed=s)])[0][0] for s in range(200)]
    through_filter = [sample(logits[:1], [_seq(temperature=0.8, seed=s, min_p=1e-30)])[0][0] for s in range(200)]
    assert plain == through_filter
    assert torch.allclose(_filtered_probs(logits, [_seq(temperature=0.8, top_k=V)] * 2), torch.softmax(logits / 0.8, -1))


def test_top_k_top_p_min_p_keep_exactly_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda **kw: (_filtered_probs(logits, [_seq(temperature=1.0, **kw)])[0] > 0).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False, False]
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token (0.15) is needed too
    assert keep(top_p=0.8) == [True, True, True, False, False]
    assert keep(top_p=0.5) == [True, False, False, False, False]
    # min-p 0.3: keep p >= 0.3 * 0.5
    assert keep(min_p=0.3) == [True, True, True, False, False]
    probs = _filtered_probs(logits, [_seq(temperature=1.0, top_k=2)])[0]
    assert torch.allclose(probs[:2], torch.tensor([0.5, 0.2]) / 0.7)


def test_temperature_sharpens_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = _filtered_probs(logits, [_seq(temperature=0.5)])[0]
    assert torch.allclose(p, torch.softmax(logits[0] / 0.5, -1))


def test_seeded_sampling_is_a_function_of_seed_and_step():
    logits = torch.zeros(1, 1000)
    a = [sample(logits, [_seq(temperature=1.0, seed=7, num_generated=i)])[0][0] for i in range(5)]
    b = [sample(logits, [_seq(temperature=1.0, seed=7, num_generated=i)])[0][0] for i in range(5)]
    c = [sample(logits, [_seq(temperature=1.0, seed=8, num_generated=i)])[0][0] for i in range(5)]
    assert a == b and a != c
    assert len(set(a)) > 1  # the step enters the draw


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    draws = [sample(logits, [_seq(temperature=1.0, seed=s)])[0][0] for s in range(2000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.04), freq


def test_top_logprobs_are_sorted_best_first():
    row = torch.log_softmax(torch.tensor([0.1, 3.0, 2.0, -1.0]), -1)
    top = top_logprobs(row, 2)
    assert [t for t, _ in top] == [1, 2] and top[0][1] > top[1][1]
