"""End to end through the router actor and Ray worker actors on the real SmolLM2 Q4_1 GGUF."""

from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def llm(ray_session, smollm2_path):
    engine = LLM(smollm2_path, tp_size=1, device="cpu", kv_cache_memory_gb=0.25, cpu_threads_per_worker=2)
    yield engine
    engine.shutdown()


def test_capital_of_france_is_paris(llm):
    out = llm.generate(["The capital of France is"], GREEDY)[0]
    assert out.outputs[0].text.startswith(" Paris"), out.outputs[0].text
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 8


def test_chat_uses_the_gguf_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=16, temperature=0))
    assert "Paris" in out[0].outputs[0].text
    # the template's default system prompt was rendered in front (SmolLM2's GGUF template)
    assert out[0].prompt_token_ids[0] == 1  # <|im_start|>
