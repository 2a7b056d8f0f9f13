"""The seeds' two SGLang Ascend command lines ("Quantization on Ascend", GGUF usage), with `shardserve serve` in
place of `python3 -m sglang.launch_server`, flags and all, start a server that answers the unmodified `openai`
client (a completion). Two substitutions only: the model and the port (a free one). The Qwen3 files are not here (no model hub), so
each line gets a Q4_K_M GGUF of its kind that TP=2 can split: the dense line the real gemma3 270M Q4_K_M from
PyPI, the MoE line a small qwen3moe quantized by llama.cpp's own quantizer (tests/fixtures). `--device npu --attention-backend ascend` runs on the torch_npu EMULATION (tests/npu_emulation:
plain torch, gloo for HCCL) through a `ray start --head` that declares 2 NPUs: this checks that the command lines
are taken and served end to end, not Ascend's kernels. The server joins that head through RAY_ADDRESS, as under
`ray job submit`."""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys

import httpx
import pytest
from openai import OpenAI

from tests.cluster.test_batch import _forget_head, _free_port
from tests.cluster.test_http_server import _wait_healthy
from tests.fixtures import gguf_quantized
from tests.fixtures.gemma3 import gemma3_gguf
from tests.workers.device.conftest import EMULATION_DIR

SEED_LINES = [  # ../shared/seeds: the dense and the MoE example
    "--model-path Qwen3-14B-Q4_K_M.gguf --device npu --attention-backend ascend --host 0.0.0.0 --port 30000 "
    "--mem-fraction-static 0.7 --tp-size 2",
    "--model-path Qwen3-30B-A3B-Q4_K_M.gguf --device npu --attention-backend ascend --host 0.0.0.0 --port 30000 "
    "--mem-fraction-static 0.8 --tp-size 2",
]
EXE = os.path.join(os.path.dirname(sys.executable), "shardserve")


def _substituted(line: str, model: str, port: int) -> list[str]:
    argv = shlex.split(line)
    argv[argv.index("--model-path") + 1] = model
    argv[argv.index("--port") + 1] = str(port)
    return argv


@pytest.mark.slow  # a Ray head and two TP=2 loads on the emulated NPU: about 2 minutes
def test_the_seeds_command_lines_serve_on_the_emulated_npu(tmp_path, cache_dir):
    models = [gemma3_gguf(cache_dir), gguf_quantized.moe("Q4_K_M").path]
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs = _free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "PYTHONPATH": EMULATION_DIR}
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus",
         "4", "--resources", '{"NPU": 2}', "--include-dashboard", "false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        for line, model in zip(SEED_LINES, models):
            port = _free_port()
            log = tmp_path / f"serve-{port}.log"
            with open(log, "w") as out:
                server = subprocess.Popen([EXE, "serve", *_substituted(line, model, port)], stdout=out,
                                          stderr=subprocess.STDOUT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"})
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_healthy(server, url, str(log))
                client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
                done = client.completions.create(model=client.models.list().data[0].id, prompt="The capital of France is",
                                                 max_tokens=8, temperature=0)  # neither file has a chat template
                assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens > 0
                info = httpx.get(f"{url}/metrics", timeout=10).text
                assert "vllm:num_requests_running" in info
            except BaseException:
                print(log.read_text()[-4000:])
                raise
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=90)
            text = log.read_text()  # the start-up line reports each rank's device (the emulation's, on gloo)
            assert text.count("'device': 'npu'") == 2 and "'dist_backend': 'gloo'" in text, text[-3000:]
    finally:
        head.terminate()
        head.wait(timeout=60)
        _forget_head(gcs)
