"""`shardserve serve-config`: the Ray Serve config (a KubeRay RayService's serveConfigV2) of `shardserve serve` flags.

The flags are parsed by the `serve` subcommand's own parser (cli.py), so a flag means here what it means there. The
application's `args` are the EngineConfig and IngressOptions fields whose value differs from the dataclass default,
under the dataclass names that serve_app.configs_from_args reads back: `build_app` then builds the configs that
`shardserve serve --ray-serve` builds from the same flags. `--host`, `--port` and `--shutdown-grace-s` become Serve's
`http_options` and the ingress deployment's `graceful_shutdown_timeout_s` where they differ from `serve`'s defaults;
left at those, Serve's own apply (HTTP on 0.0.0.0:8000, the port of the `serve` container port KubeRay routes to).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from shardserve.cluster.config import EngineConfig

IMPORT_PATH = "shardserve.cluster.serve_app:build_app"
INGRESS_DEPLOYMENT = "OpenAIIngress"  # serve_app's deployment: the name Serve's per-deployment options take


def builder_args(args: argparse.Namespace) -> dict:
    """The `build_app` args of parsed `serve` flags: every config field the flags set away from its default."""
    from shardserve.cluster.serve_app import IngressOptions

    if not args.model_path:
        # EngineConfig would resolve the embedded default model to a path on this machine, not on the cluster
        raise ValueError("--model-path is required: the model's path on the cluster's nodes (e.g. /models/...)")
    out = {}
    for cls in (EngineConfig, IngressOptions):
        for f in dataclasses.fields(cls):
            if hasattr(args, f.name) and getattr(args, f.name) != f.default:
                out[f.name] = getattr(args, f.name)
    return out


def serve_config(args: argparse.Namespace, serve_defaults: argparse.Namespace) -> dict:
    """The Serve config (`serve deploy`'s schema, a RayService's serveConfigV2) of parsed `serve` flags;
    `serve_defaults` are what the `serve` parser gives with no flags."""
    from shardserve.cluster.serve_app import IngressOptions

    app = {"name": IngressOptions.app_name, "import_path": IMPORT_PATH, "route_prefix": "/", "args": builder_args(args)}
    if args.shutdown_grace_s != serve_defaults.shutdown_grace_s:
        app["deployments"] = [{"name": INGRESS_DEPLOYMENT, "graceful_shutdown_timeout_s": args.shutdown_grace_s}]
    config: dict = {"applications": [app]}
    http = {k: getattr(args, k) for k in ("host", "port") if getattr(args, k) != getattr(serve_defaults, k)}
    if http:
        config["http_options"] = http
    return config


def render(args: argparse.Namespace, serve_defaults: argparse.Namespace) -> str:
    """The config as YAML, in the order a reader expects (applications first, then each app's name and path)."""
    return yaml.safe_dump(serve_config(args, serve_defaults), sort_keys=False)


def print_serve_config(args: argparse.Namespace, serve_parser: argparse.ArgumentParser) -> None:
    """The `shardserve serve-config` command: the YAML on stdout, a usage error as the exit message."""
    try:
        sys.stdout.write(render(args, serve_parser.parse_args([])))
    except ValueError as e:
        raise SystemExit(f"shardserve serve-config: {e}") from None
