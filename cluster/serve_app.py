"""Ray Serve ingress: the FastAPI app of `shardserve serve` as a Serve deployment in front of the router actor.

An application builder, so that `serve run`, a Serve config file and a KubeRay RayService start it alike:

    serve run shardserve.cluster.serve_app:build_app model_path=/models/m tp_size=2 device=npu
    # serveConfigV2: applications: [{name: shardserve, import_path: shardserve.cluster.serve_app:build_app,
    #                                route_prefix: /, args: {model_path: /models/m, tp_size: 2}}]

`args` are EngineConfig's fields (the CLI's, under their dataclass names), plus the HTTP options `api_key`,
`max_body_bytes`, `enable_metrics_auth` and `ingress_replicas`. `shardserve serve --ray-serve` builds the same
application from its flags. The ingress replicas share one engine: the first starts the router (named after the
application and its engine config, detached), the others attach to it, and the last to stop shuts it down, so
Serve may stop any replica (a scale-down, a rolling update) while the others serve; a replica whose router died
fails its health check and Serve replaces it, starting a new engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
import typing
import uuid
from dataclasses import dataclass

import ray
from ray import serve

from shardserve.cluster.config import EngineConfig
from shardserve.cluster.launch import RAY_NAMESPACE, start_router
from shardserve.cluster.server import MAX_BODY_BYTES, create_app

logger = logging.getLogger(__name__)
SERVE_NAMESPACE = "serve"  # where Ray Serve creates its replica actors
ATTACH_TIMEOUT_S = 600.0  # another replica is loading the engine: wait this long for it to serve


@dataclass
class IngressOptions:
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    enable_metrics_auth: bool = False
    ingress_replicas: int = 1
    app_name: str = "shardserve"


def configs_from_args(args: dict) -> tuple[EngineConfig, IngressOptions]:
    """Builder args (strings from `serve run key=value`, or typed values from a config file) -> the two configs;
    an unknown key is an error naming it and the keys there are."""
    engine_fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    ingress_fields = {f.name: f for f in dataclasses.fields(IngressOptions)}
    unknown = sorted(set(args) - set(engine_fields) - set(ingress_fields))
    if unknown:
        raise ValueError(f"unknown shardserve arguments {unknown}; known: {sorted({*engine_fields, *ingress_fields})}")
    engine = {k: _coerce(EngineConfig, engine_fields[k], v) for k, v in args.items() if k in engine_fields}
    ingress = {k: _coerce(IngressOptions, ingress_fields[k], v) for k, v in args.items() if k in ingress_fields}
    return EngineConfig(**engine), IngressOptions(**ingress)


def _coerce(cls, f: dataclasses.Field, value):
    """A `serve run` string into the field's type (int, float, bool, str, or None for 'none'/'null')."""
    if not isinstance(value, str):
        return value
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    kind = args[0]
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{f.name}={value!r}: expected true or false")
        return value.lower() in ("true", "1", "yes")
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{f.name}={value!r}: expected {kind.__name__}") from None


def engine_name(cfg: EngineConfig, options: IngressOptions) -> str:
    """The shared engine's actor name: the application's, and its engine config's, so that replicas of a changed
    config (an update that starts new replicas before the old ones stop) start a new engine, never attach to the
    old one; the old one goes when its last replica stops."""
    key = hashlib.sha256(repr(sorted(dataclasses.asdict(cfg).items())).encode()).hexdigest()[:12]
    return f"shardserve-router-{options.app_name}-{key}"


def attach_or_start_router(cfg: EngineConfig, name: str, user: str, namespace: str):
    """The application's engine (its router actor), attached to where another ingress replica started it (waiting
    while it loads), else started here, detached: it outlives the replica that started it, so that Serve may stop
    any replica (a scale-down, a rolling update) while the others serve; the last replica to detach shuts it down."""
    try:
        router = ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        try:
            router, info = start_router(cfg, name=name, detached=True)
            logger.info("ingress started the engine %s: %s", name, info)
        except ValueError as e:
            if "already" not in str(e):  # another replica won the race to create it
                raise
            router = ray.get_actor(name, namespace=RAY_NAMESPACE)
    ray.get(router.attach.remote(user, namespace))
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while not ray.get(router.health.remote()).get("ok"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine {name} did not start serving within {ATTACH_TIMEOUT_S:.0f}s")
        time.sleep(0.5)
    return router


@serve.deployment(ray_actor_options={"num_cpus": 0})  # the engine's workers hold the devices and cores
@serve.ingress()
class OpenAIIngress:
    def __init__(self, cfg: EngineConfig, options: IngressOptions):
        self.cfg, self.options = cfg, options
        # this replica's actor, as the engine counts its users (Serve's actors live in its own namespace)
        self.user = ray.get_runtime_context().get_actor_name() or uuid.uuid4().hex
        self.router = attach_or_start_router(cfg, engine_name(cfg, options), self.user, SERVE_NAMESPACE)

    def __serve_build_asgi_app__(self):
        o = self.options
        return create_app(self.router, self.cfg.model_name, o.api_key, max_body_bytes=o.max_body_bytes,
                          metrics_auth=o.enable_metrics_auth)

    async def check_health(self) -> None:
        """Serve's probe: the router actor answers (else Serve replaces this ingress replica, which starts a new
        engine). An engine replica being rebuilt after a worker died is the router's to handle, not a failure here."""
        await asyncio.wait_for(self.router.health.remote(), timeout=30)


    def __del__(self) -> None:
        """Serve stops this replica (a scale-down, an update, the application deleted): the last replica using the
        engine shuts it down, giving back its workers and placement groups (a detached actor would otherwise keep
        them for the cluster's life)."""
        router = getattr(self, "router", None)
        if router is None:
            return
        try:
            if ray.get(router.detach.remote(self.user), timeout=60) == 0:
                ray.get(router.shutdown.remote(), timeout=60)
                ray.kill(router)
        except ray.exceptions.RayActorError:  # the engine is gone already
            pass


def build_app(args: dict) -> serve.Application:
    """The Serve application builder (`import_path: shardserve.cluster.serve_app:build_app`)."""
    cfg, options = configs_from_args(args)
    return OpenAIIngress.options(num_replicas=options.ingress_replicas).bind(cfg, options)
