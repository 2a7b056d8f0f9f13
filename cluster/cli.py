"""The `shardserve` command: serve (OpenAI HTTP), generate (one-off prompts), batch (an OpenAI batch file),
serve-config (the Ray Serve config of serve's flags). Flags follow SGLang's launch_server."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from shardserve.cluster.config import MAX_BODY_BYTES, EngineConfig, HttpOptions
from shardserve.cluster.serve_config import print_serve_config


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", "--model", dest="model_path", default="", help="GGUF file or HF directory (default: SmolLM2-135M Q4_1)")
    p.add_argument("--device", default="auto", choices=["auto", "npu", "cuda", "cpu"])
    p.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=1)
    p.add_argument("--dp-size", "--dp", dest="dp_size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, help="override detection (must agree with the files)")
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache size on CPU")
    p.add_argument("--max-running-requests", dest="max_num_seqs", type=int, default=64)
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting to run, past which new ones get 503 + Retry-After")
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=None,
                   help="seconds a request may run before it ends with an error")
    p.add_argument("--chunked-prefill-size", dest="max_num_batched_tokens", type=int, default=2048)
    p.add_argument("--context-length", dest="max_model_len", type=int, default=None)
    p.add_argument("--page-size", dest="block_size", type=int, default=16)
    p.add_argument("--disable-radix-cache", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="wait for each step's result before sending the next (default: one step ahead)")
    p.add_argument("--enable-expert-parallel", "--enable-ep-moe", dest="enable_expert_parallel", action="store_true",
                   help="MoE: partition the experts over the TP ranks")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--cpu-threads-per-worker", type=int, default=None)
    # SGLang's flag, so that its Ascend command lines run as they are: "ascend" is our NPU table's attention
    # (torch_npu), "torch_native" the plain-torch one of the CPU and CUDA tables; others are refused by name
    p.add_argument("--attention-backend", default=None, choices=list(ATTENTION_BACKENDS))
    p.add_argument("--gguf-dequantize", action="store_true",
                   help="GGUF: dequantize weights to the compute dtype at load instead of keeping them quantized")


ATTENTION_BACKENDS = {"ascend": ("npu",), "torch_native": ("cpu", "cuda")}  # backend -> the devices that run it


def _check_attention_backend(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--attention-backend must name the attention of the chosen device: ascend picks the NPU under --device auto."""
    backend = getattr(args, "attention_backend", None)
    if backend is None:
        return
    devices = ATTENTION_BACKENDS[backend]
    if args.device == "auto" and len(devices) == 1:
        args.device = devices[0]
    elif args.device != "auto" and args.device not in devices:
        parser.error(f"--attention-backend {backend} runs on --device {' or '.join(devices)}, not {args.device}")


def _config(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def serve(args: argparse.Namespace) -> None:
    """The router actor on this node serves the HTTP app from its own process (a token reaches its client with no
    Ray hop); this process watches it. SIGINT/SIGTERM: the server stops accepting and lets the requests in flight
    finish (within --shutdown-grace-s), then the router releases the workers and placement groups, so a shared
    cluster keeps nothing of ours."""
    import ray

    from shardserve.cluster.launch import start_router

    cfg = _config(args)
    if args.ray_serve:
        return _serve_on_ray_serve(cfg, args)
    log = logging.getLogger("shardserve")
    router, info = start_router(cfg, name="shardserve-router", here=True)
    # a signal stops the server at once (from the handler: the main thread's wait below lets it run promptly)
    stop = _stop_on_signals(lambda: router.stop_http.remote())
    options = HttpOptions(args.host, args.port, cfg.model_name, args.api_key, args.max_body_bytes,
                          args.enable_metrics_auth, args.shutdown_grace_s)
    try:
        ray.get(router.serve_http.remote(options))
    except ray.exceptions.RayTaskError as e:  # the port is taken, say: the cause itself, after releasing the workers
        _release(router)
        raise e.as_instanceof_cause() from None
    log.info("serving %s on http://%s:%d (%s)", cfg.model_name, args.host, args.port, info)
    ended = router.wait_http.remote()
    gone = threading.Event()  # the server stopped by itself: its router actor died, or the server failed
    threading.Thread(target=lambda: (ray.wait([ended]), gone.set()), daemon=True, name="shardserve-watch").start()
    while not stop.wait(0.2) and not gone.is_set():
        pass
    if not stop.is_set():
        ray.get(ended)  # raises why
        raise SystemExit("the HTTP server stopped")
    ray.get(router.stop_http.remote())  # again, should the signal have come before the server started
    log.info("drained; releasing the workers")
    _release(router)


def _stop_on_signals(then=None) -> threading.Event:
    """An Event set by SIGINT or SIGTERM (installed after Ray's start, whose core installs its own); `then()` runs
    in the handler at the first signal."""
    stop = threading.Event()

    def handle(*_) -> None:
        if not stop.is_set() and then is not None:
            then()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    return stop


def _release(router) -> None:
    import ray

    ray.get(router.shutdown.remote())
    ray.kill(router)


def _serve_on_ray_serve(cfg: EngineConfig, args: argparse.Namespace) -> None:
    """The same app as a Ray Serve deployment (cluster/serve_app.py) with Serve's HTTP proxy on --host/--port;
    runs until SIGINT/SIGTERM, then deletes the application (its engine with it)."""
    from ray import serve

    from shardserve.cluster.launch import init_ray
    from shardserve.cluster.serve_app import IngressOptions, OpenAIIngress

    init_ray(cfg)
    stop = _stop_on_signals()
    options = IngressOptions(args.api_key, args.max_body_bytes, args.enable_metrics_auth, args.ingress_replicas)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(OpenAIIngress.options(num_replicas=options.ingress_replicas).bind(cfg, options), name=options.app_name,
              route_prefix="/")
    logging.getLogger("shardserve").info("serving %s through Ray Serve on http://%s:%d", cfg.model_name, args.host, args.port)
    while not stop.wait(1.0):  # a timed wait, so that the signal handler runs promptly
        pass
    serve.delete(options.app_name)
    serve.shutdown()


def generate(args: argparse.Namespace) -> None:
    from shardserve import LLM, SamplingParams

    cfg = _config(args)
    llm = LLM(**{"model": cfg.model_path, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "model_path"}})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outs = llm.generate(args.prompt, params)
    for out in outs:
        sys.stdout.write(out.outputs[0].text + "\n")


def batch(args: argparse.Namespace) -> None:
    import asyncio

    import ray

    from shardserve.cluster.batch import run_batch
    from shardserve.cluster.launch import start_router
    from shardserve.cluster.server import create_app

    cfg = _config(args)
    router, info = start_router(cfg)
    log = logging.getLogger("shardserve")
    log.info("batch %s -> %s on %s (%s)", args.input, args.output, cfg.model_name, info)
    try:
        app = create_app(router, cfg.model_name)
        concurrency = args.max_concurrency or cfg.max_num_seqs
        report = asyncio.run(run_batch(app, args.input, args.output, concurrency, progress=not args.no_progress))
    finally:
        ray.get(router.shutdown.remote())
        ray.kill(router)
    for message in report.errors[:20]:
        log.warning("%s", message)
    log.info("%s", report.summary())
    sys.stdout.write(report.summary() + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=30000)
    s.add_argument("--api-key", default=None, help="required on every route but /health and /metrics")
    s.add_argument("--enable-metrics-auth", action="store_true",
                   help="with --api-key, /metrics needs the key too (default: Prometheus scrapes it without)")
    s.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get a 413")
    s.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM, how long requests in flight may take to finish")
    s.add_argument("--ray-serve", action="store_true",
                   help="serve through a Ray Serve deployment (shardserve.cluster.serve_app:build_app) instead of uvicorn")
    s.add_argument("--ingress-replicas", type=int, default=1, help="with --ray-serve: HTTP ingress replicas")
    s.set_defaults(func=serve)
    c = sub.add_parser("serve-config", parents=[s], add_help=False,
                       help="print the Ray Serve config (a RayService's serveConfigV2) that serves with these serve flags")
    c.set_defaults(func=lambda args: print_serve_config(args, s))
    g = sub.add_parser("generate", help="generate from prompts given on the command line")
    _engine_args(g)
    g.add_argument("prompt", nargs="+")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    g.set_defaults(func=generate)
    b = sub.add_parser("batch", help="run an OpenAI batch file (JSONL), writing one result line per request")
    _engine_args(b)
    b.add_argument("--input", required=True, help="JSONL of {custom_id, method, url, body}")
    b.add_argument("--output", required=True, help="JSONL results, appended; a rerun skips the custom_ids in it")
    b.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once (default: --max-running-requests)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.set_defaults(func=batch)
    args = parser.parse_args(argv)
    _check_attention_backend(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
