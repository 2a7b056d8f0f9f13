"""The worker's Ray actor class, importable without torch: its process builds the Worker (workers/worker.py, torch
and the model code) only when the actor starts. The router creates worker actors from it, so the router's process
never imports torch: doing so (to pickle the Worker class) cost ~1.5 s of a 2-core machine's start, before the first
worker could even be placed. Each method runs the Worker's."""

from __future__ import annotations

# the Worker methods a replica calls through Ray (the step channel carries the steps themselves)
METHODS = ("node_ip", "free_port", "init", "kv_block_bytes", "kv_cache_budget", "init_cache", "open_step_channel",
           "ping")


class Worker:
    """Named as the class it runs, so that Ray's state and logs say `Worker` (ray::Worker)."""

    def __init__(self, *args, **kwargs):
        from shardserve.workers.worker import Worker

        self._worker = Worker(*args, **kwargs)


def _forward(name: str):
    def method(self, *args, **kwargs):
        return getattr(self._worker, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


for _name in METHODS:
    setattr(Worker, _name, _forward(_name))
