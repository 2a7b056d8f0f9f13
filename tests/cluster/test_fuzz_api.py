"""Property-based fuzz of the HTTP surface of the real `shardserve serve` (issue 20): bodies drawn from strategies
shaped on the request models, each field valid, out of range, of the wrong type or absent, plus arbitrary JSON
and random bytes. Whatever arrives, the answer is not a 5xx, comes within the timeout, and an error is
OpenAI-shaped; afterwards the server is healthy with nothing running and every KV block free.

Bounded for CI: a fixed number of examples per test, derandomized so that a run repeats; valid requests stay
cheap (max_tokens <= 4, n <= 2, a few short prompts)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster.test_bad_requests import assert_openai_error
from tests.cluster.test_http_server import AUTH, MODEL, _wait_idle

# the `server` fixture, module-scoped: this module starts a server of its own
from tests.cluster.test_http_server import server as _server  # noqa: F401

EXAMPLES = 30
VOCAB = 49152
TIMEOUT_S = 60
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ABSENT = object()
JSON = {"Content-Type": "application/json"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
huge = st.sampled_from([2**63, -(2**63) - 1, 10**30, -(10**30)])


NONE = st.nothing()


def field(valid, bad=NONE, required: bool = False) -> tuple:
    return valid if required else valid | st.just(ABSENT), bad


def body(**fields: tuple) -> st.SearchStrategy[dict]:
    """A body of valid values (each optional field present or not), then up to two fields made faulty: out of
    range, huge, any JSON value (mostly of the wrong type), or left out."""

    @st.composite
    def draw(d):
        b = {k: d(valid) for k, (valid, _) in fields.items()}
        for k in d(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
            b[k] = d(st.one_of(fields[k][1], huge, json_values, st.just(ABSENT)))
        return {k: v for k, v in b.items() if v is not ABSENT}

    return draw()


text = st.text(max_size=40)
ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
bad_ids = st.lists(st.integers(-5, 2 * VOCAB) | huge, max_size=8)
stop = st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3))
part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": text | st.lists(part, min_size=1, max_size=2)}
)
bad_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["wizard", "", "tool", "developer", "user"]) | json_values,
        "content": json_values | st.lists(st.fixed_dictionaries({"type": text, "text": json_values}), max_size=2),
    }
)
common = dict(
    model=field(st.just(MODEL), st.text(max_size=10)),
    max_tokens=field(st.integers(1, 4), st.integers(-3, 0) | st.integers(200, 10**6), required=True),
    temperature=field(st.floats(0, 2), st.floats(2.01, 1e9) | st.floats(-1e9, -0.01) | st.floats()),
    top_p=field(st.floats(0.01, 1), st.sampled_from([0, -1, 1.5])),
    top_k=field(st.integers(-1, 50), st.integers(-100, -2)),
    min_p=field(st.floats(0, 1), st.sampled_from([-0.5, 1.5])),
    n=field(st.integers(1, 2), st.sampled_from([0, -1, 129])),
    seed=field(st.integers(0, 2**32)),
    stop=field(stop, st.lists(st.text(min_size=1, max_size=3), min_size=17, max_size=20) | st.text(min_size=257, max_size=300)),
    stop_token_ids=field(st.lists(st.integers(0, VOCAB - 1), max_size=3), st.lists(st.integers(-5, -1), min_size=1, max_size=2)),
    ignore_eos=field(st.booleans()),
    min_tokens=field(st.integers(0, 1), st.integers(-3, -1) | st.integers(5, 10)),
    stream=field(st.booleans()),
    stream_options=field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    presence_penalty=field(st.just(0), st.floats(-5, 5)),
    frequency_penalty=field(st.just(0), st.floats(-5, 5)),
    logit_bias=field(st.just({}), st.dictionaries(st.text(max_size=5), st.floats(-100, 100), min_size=1, max_size=2)),
    user=field(text),
)
completion_bodies = body(
    prompt=field(
        text | ids | st.lists(text, min_size=1, max_size=3) | st.lists(ids, min_size=1, max_size=3),
        bad_ids | st.just("") | st.just([[]]) | st.just("hello " * 300),
        required=True,
    ),
    logprobs=field(st.integers(0, 5), st.sampled_from([-1, 21, 100])),
    prompt_logprobs=field(st.integers(0, 2), st.sampled_from([-1, 21])),
    echo=field(st.booleans()),
    **common,
)
chat_bodies = body(
    messages=field(st.lists(message, min_size=1, max_size=3), st.lists(bad_message, max_size=2), required=True),
    logprobs=field(st.booleans()),
    top_logprobs=field(st.integers(0, 5), st.sampled_from([-1, 21])),
    max_completion_tokens=field(st.integers(1, 4), st.integers(-2, 0)),
    **common,
)
STATUSES: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def http(_server) -> Iterator[httpx.Client]:  # noqa: F811
    with httpx.Client(base_url=_server, headers=AUTH, timeout=TIMEOUT_S) as c:
        yield c


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_openai_error(r)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", r.text[-500:]
        for e in events[:-1]:
            assert "error" not in json.loads(e[6:]), e
    else:
        assert r.json()["choices"], r.text


def _dumps(value) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity too: Python's json, hence FastAPI, reads them


def _post(http: httpx.Client, path: str, **kw) -> None:
    r = http.post(path, **kw)
    STATUSES.setdefault(path, []).append(r.status_code)
    _check(r)


@FUZZ
@given(completion_bodies)
def test_fuzz_completions(http, b):
    _post(http, "/v1/completions", content=_dumps(b), headers=JSON)


@FUZZ
@given(chat_bodies)
def test_fuzz_chat(http, b):
    _post(http, "/v1/chat/completions", content=_dumps(b), headers=JSON)


@FUZZ
@given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), json_values | st.dictionaries(st.sampled_from(["prompt", "messages", "max_tokens", "n", "stop", "model"]), json_values))
def test_fuzz_arbitrary_json(http, path, value):
    _post(http, path, content=_dumps(value), headers=JSON)


@FUZZ
@given(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/v1/x"]), st.binary(max_size=200))
def test_fuzz_random_bytes(http, path, raw):
    _post(http, path, content=raw, headers=JSON)


def test_healthy_and_nothing_left_after_the_fuzz(http):
    # the fuzz reached the engine: some bodies of each endpoint were served, some refused
    print({p: {c: codes.count(c) for c in sorted(set(codes))} for p, codes in STATUSES.items()})
    for path in ("/v1/completions", "/v1/chat/completions"):
        codes = STATUSES.get(path, [])
        assert 200 in codes and any(400 <= c < 500 for c in codes), (path, sorted(set(codes)))
    assert http.get("/health").status_code == 200
    m, _ = _wait_idle(http, timeout_s=60)
    assert m["shardserve_running"] == 0 and m["shardserve_waiting"] == 0, m
    assert m["shardserve_free_blocks"] == m["shardserve_total_blocks"], m
