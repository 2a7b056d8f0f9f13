"""`shardserve serve-config` (cluster/serve_config.py): the RayService's serveConfigV2 is what the command renders
from the flags written above it, and the rendered args build, through serve_app.configs_from_args, the very configs
that `shardserve serve --ray-serve` builds from the same flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from shardserve.cluster import cli
from shardserve.cluster.config import EngineConfig

RAYSERVICE = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "rayservice.yaml"
FLAG_SETS = [
    "--model-path /models/m.gguf --tp-size 2 --dp-size 3 --device npu",
    # SGLang's Ascend command line: --attention-backend ascend picks the NPU under --device auto
    "--model-path /models/Qwen3-14B-Q4_K_M.gguf --attention-backend ascend --mem-fraction-static 0.7 --tp-size 2",
    "--model /models/q --disable-radix-cache --enable-ep-moe --gguf-dequantize --context-length 4096 --page-size 32",
    "--model-path /m --request-timeout 30 --max-queued-requests 8 --max-running-requests 4 --chunked-prefill-size 512",
    "--model-path /m --quantization w8a8 --dtype bfloat16 --served-model-name q --kv-cache-memory-gb 2.5",
    "--model-path /m --api-key sk-1 --enable-metrics-auth --max-body-bytes 1024 --ingress-replicas 3 --ray-serve",
    "--model-path /m --port 9000 --host 10.0.0.1 --shutdown-grace-s 5 --tp-size 4",
]


def rendered(capsys, flags: list[str]) -> str:
    cli.main(["serve-config", *flags])
    return capsys.readouterr().out


def cli_configs(monkeypatch, flags: list[str]):
    """What `shardserve serve --ray-serve FLAGS` would serve: the same steps as cli.serve and _serve_on_ray_serve."""
    from shardserve.cluster.serve_app import IngressOptions

    seen = {}
    monkeypatch.setattr(cli, "serve", lambda args: seen.setdefault("args", args))
    cli.main(["serve", *flags])
    args = seen["args"]
    options = IngressOptions(args.api_key, args.max_body_bytes, args.enable_metrics_auth, args.ingress_replicas)
    return cli._config(args), options


def manifest_flags_and_config() -> tuple[list[str], str]:
    text = RAYSERVICE.read_text()
    (flags,) = re.findall(r"^\s*# shardserve serve-config (.+)$", text, re.M)
    return shlex.split(flags), yaml.safe_load(text)["spec"]["serveConfigV2"]


def test_the_rayservice_serve_config_is_the_rendered_one(capsys):
    flags, embedded = manifest_flags_and_config()
    assert embedded == rendered(capsys, flags), "re-render it: shardserve serve-config " + shlex.join(flags)


@pytest.mark.parametrize("flags", [*FLAG_SETS, shlex.join(manifest_flags_and_config()[0])])
def test_rendered_args_build_the_clis_configs(flags, capsys, monkeypatch):
    from shardserve.cluster.serve_app import IngressOptions, configs_from_args

    argv = shlex.split(flags)
    config = yaml.safe_load(rendered(capsys, argv))
    (app,) = config["applications"]
    assert app["import_path"] == "shardserve.cluster.serve_app:build_app" and app["route_prefix"] == "/"
    engine, options = cli_configs(monkeypatch, argv)
    assert (engine, options) != (EngineConfig(model_path=engine.model_path), IngressOptions()), "flags that change nothing"
    assert configs_from_args(app["args"]) == (engine, options)
    assert app["name"] == options.app_name


def test_http_and_shutdown_flags_become_serves_options(capsys):
    config = yaml.safe_load(rendered(capsys, shlex.split(FLAG_SETS[-1])))
    assert config["http_options"] == {"host": "10.0.0.1", "port": 9000}
    assert config["applications"][0]["deployments"] == [{"name": "OpenAIIngress", "graceful_shutdown_timeout_s": 5.0}]
    # left at serve's defaults (127.0.0.1:30000, for a laptop), Serve's own apply: 0.0.0.0:8000, where KubeRay routes
    plain = yaml.safe_load(rendered(capsys, ["--model-path", "/m"]))
    assert set(plain) == {"applications"} and "deployments" not in plain["applications"][0]


@pytest.mark.parametrize("flags", [FLAG_SETS[-1], shlex.join(manifest_flags_and_config()[0])])
def test_the_config_passes_ray_serves_own_schema(flags, capsys):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(rendered(capsys, shlex.split(flags))))
    assert config.applications[0].import_path == "shardserve.cluster.serve_app:build_app"
    with pytest.raises(ValueError, match="import_path"):  # the schema does check: a path without its attribute
        ServeDeploySchema.model_validate({"applications": [{"name": "x", "import_path": "shardserve", "args": {}}]})


def test_serve_config_needs_a_model_path_and_known_flags(capsys):
    with pytest.raises(SystemExit, match="--model-path is required"):
        cli.main(["serve-config", "--tp-size", "2"])
    with pytest.raises(SystemExit):
        cli.main(["serve-config", "--model-path", "/m", "--tp", "two"])
    assert "invalid int value: 'two'" in capsys.readouterr().err


def test_serve_config_leaves_serves_defaults_alone(monkeypatch):
    """serve-config takes serve's flags through argparse's parents, which shares serve's flag objects: serve's own
    defaults (and handler) must stay what they were."""
    seen = {}
    monkeypatch.setattr(cli, "serve", lambda args: seen.setdefault("args", args))
    cli.main(["serve"])
    args = seen["args"]
    assert (args.host, args.port, args.shutdown_grace_s, args.ray_serve) == ("127.0.0.1", 30000, 30.0, False)
    assert args.func is cli.serve
