"""The Ray Serve ingress (cluster/serve_app.py): the application builder `serve run` and a RayService use, driven by
the unmodified `openai` client on 127.0.0.1; scaling the ingress down keeps the engine, deleting the application
releases it."""

from __future__ import annotations

import socket
import time

import pytest
import ray

from shardserve.cluster.serve_app import build_app, configs_from_args, engine_name
from tests.fixtures.tiny_models import make_tiny


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_placement_groups() -> int:
    return sum(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values())


def _deploy_config(args: dict, replicas: int) -> None:
    """Deploy app "t" from a Serve config (the path of `serve deploy` and KubeRay's RayService: the dashboard's REST
    API hands the config to the controller, as here), its ingress at `replicas`; wait until it runs."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {"name": "t", "route_prefix": "/", "import_path": "shardserve.cluster.serve_app:build_app", "args": args,
           "deployments": [{"name": "OpenAIIngress", "num_replicas": replicas}]}
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)


def _wait(cond, what: str, timeout: float = 120, show=lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {show()}"
        time.sleep(0.2)


def _ingress_states(app: str) -> dict:
    from ray import serve

    return dict(serve.status().applications[app].deployments["OpenAIIngress"].replica_states)


def test_builder_args_are_typed_and_checked():
    cfg, options = configs_from_args({"model_path": "/m.gguf", "tp_size": "2", "enable_expert_parallel": "true",
                                      "request_timeout_s": "none", "ingress_replicas": "2", "api_key": "k"})
    assert (cfg.tp_size, cfg.enable_expert_parallel, cfg.request_timeout_s) == (2, True, None)
    assert (options.ingress_replicas, options.api_key) == (2, "k")
    with pytest.raises(ValueError, match=r"unknown shardserve arguments \['tp'\]"):
        configs_from_args({"model_path": "/m.gguf", "tp": "2"})
    with pytest.raises(ValueError, match=r"tp_size='two': expected int"):
        configs_from_args({"model_path": "/m.gguf", "tp_size": "two"})
    # the shared engine is named by the engine's config: a changed one starts its own; ingress options do not count
    base = {"model_path": "/m.gguf", "app_name": "a"}
    assert engine_name(*configs_from_args(base)) == engine_name(*configs_from_args({**base, "ingress_replicas": "3"}))
    assert engine_name(*configs_from_args(base)) != engine_name(*configs_from_args({**base, "tp_size": "2"}))
    assert engine_name(*configs_from_args(base)).startswith("shardserve-router-a-")


def test_openai_client_streams_a_chat_through_ray_serve(ray_session, cache_dir):
    from openai import OpenAI
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_path": make_tiny("llama", cache_dir), "device": "cpu", "kv_cache_memory_gb": "0.05",
            "cpu_threads_per_worker": "1", "served_model_name": "tiny", "ingress_replicas": "2", "app_name": "t"}
    engine = engine_name(*configs_from_args(args))
    try:
        serve.run(build_app(args), name="t", route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        ))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > 0
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        # both ingress replicas answer from the one engine: the same greedy text
        again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert again.choices[0].message.content == text
        info = ray.get(ray.get_actor(engine, namespace="shardserve").get_info.remote())
        assert len(info["workers"]) == 1  # one engine (one TP group) behind the two ingress replicas
        # deployed from a Serve config, as a RayService does; then the replica that started the engine crashes
        # (SIGKILL-like ray.kill: no __del__) and Serve replaces it, and the config scales the ingress down to one
        # (num_replicas alone changes: Serve stops a replica and redeploys nothing): the engine serves on
        # throughout, the same actor with the same workers; only the last replica to stop shuts it down
        _deploy_config(args, replicas=2)
        router = ray.get_actor(engine, namespace="shardserve")
        info = ray.get(router.get_info.remote())
        users = ray.get(router.attached.remote())
        assert len(users) == 2
        starter = users[0]
        ray.kill(ray.get_actor(starter, namespace="serve"), no_restart=True)
        # (detach of a user never attached: a count that forgets users whose actor is gone)
        _wait(lambda: _ingress_states("t") == {"RUNNING": 2} and ray.get(router.detach.remote("nobody")) == 2
              and starter not in ray.get(router.attached.remote()), "Serve to replace the crashed replica",
              show=lambda: (_ingress_states("t"), starter, ray.get(router.attached.remote())))
        _deploy_config(args, replicas=1)
        _wait(lambda: _ingress_states("t") == {"RUNNING": 1}, "the scale-down")
        after = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert after.choices[0].message.content == text
        still = ray.get_actor(engine, namespace="shardserve")
        assert still._actor_id == router._actor_id
        assert ray.get(still.get_info.remote())["workers"] == info["workers"]
        assert ray.get(still.detach.remote("nobody")) == 1  # one live ingress replica uses it now
    finally:
        serve.delete("t")
        serve.shutdown()
    _wait(lambda: _live_placement_groups() == 0, "the engine's placement groups to go")
    with pytest.raises(ValueError):  # the detached engine is gone too, the crashed replica's share included
        ray.get_actor(engine, namespace="shardserve")


@pytest.mark.slow  # 30 s; the builder test above runs the same app in the default suite
def test_shardserve_serve_ray_serve_flag(cache_dir):
    """`shardserve serve --ray-serve`: its own local Ray, Serve's proxy on 127.0.0.1, the same API; SIGTERM deletes
    the application and exits."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "shardserve")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [exe, "serve", "--ray-serve", "--model-path", make_tiny("llama", cache_dir), "--device", "cpu",
         "--kv-cache-memory-gb", "0.05", "--cpu-threads-per-worker", "1", "--served-model-name", "tiny",
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                               json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Ray Serve ingress did not answer"
            time.sleep(1)
        assert r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    assert rc == 0, proc.stderr.read()[-3000:]
