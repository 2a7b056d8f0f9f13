"""The step channel (workers/channel.py): replies, the worker's errors, the key, and a worker process that dies."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import AuthenticationError, Client

import pytest

from shardserve.workers.channel import ChannelClosed, StepClient, StepServer


def _handle(message):
    if message == "boom":
        raise ValueError("the step raised")
    return ("echo", message)


def test_a_call_returns_the_handlers_reply():
    server = StepServer("127.0.0.1", _handle)
    client = StepClient(server.address, server.key)

    async def calls():
        return [await client.call(pickle.dumps(i)) for i in range(3)]

    assert asyncio.run(calls()) == [("echo", 0), ("echo", 1), ("echo", 2)]
    client.close()


def test_the_workers_exception_comes_back_with_its_traceback():
    server = StepServer("127.0.0.1", _handle)
    client = StepClient(server.address, server.key)
    with pytest.raises(RuntimeError, match="ValueError: the step raised"):
        asyncio.run(client.call(pickle.dumps("boom")))
    assert asyncio.run(client.call(pickle.dumps("after"))) == ("echo", "after")  # the channel survives it
    client.close()


def test_a_peer_without_the_key_is_refused_before_anything_is_unpickled():
    seen = []
    server = StepServer("127.0.0.1", seen.append)
    with pytest.raises(AuthenticationError):
        Client(tuple(server.address), authkey=os.urandom(32))
    # one connection per worker: the listener closes after it (refused, or reset if it was still closing)
    with pytest.raises((ConnectionError, EOFError)):
        Client(tuple(server.address), authkey=server.key)
    assert seen == []


def _serve_slowly(conn) -> None:
    def slow(message):
        time.sleep(60)

    server = StepServer("127.0.0.1", slow)
    conn.send((server.address, server.key))
    time.sleep(120)


def test_a_worker_that_dies_mid_step_fails_the_call_at_once():
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_slowly, args=(child,), daemon=True)
    proc.start()
    try:
        address, key = parent.recv()
        client = StepClient(address, key)

        async def call_then_kill():
            call = asyncio.ensure_future(client.call(pickle.dumps("step")))
            await asyncio.sleep(0.5)
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(call, timeout=10)
            return time.monotonic() - t0

        assert asyncio.run(call_then_kill()) < 5  # EOF, not a timeout
        with pytest.raises(ChannelClosed):
            asyncio.run(client.call(pickle.dumps("again")))
    finally:
        proc.kill()
        proc.join()


def test_with_start_each_message_is_handled_on_the_thread_start_gave_the_loop():
    """The worker hands its compute thread to the loop: a step runs where it arrived, with no handoff."""
    compute = ThreadPoolExecutor(max_workers=1)
    compute_thread = compute.submit(threading.get_ident).result()
    server = StepServer("127.0.0.1", lambda message: (message, threading.get_ident()), start=compute.submit)
    client = StepClient(server.address, server.key)

    async def calls():
        return [await client.call(pickle.dumps(i)) for i in range(3)]

    assert asyncio.run(calls()) == [(i, compute_thread) for i in range(3)]
    client.close()  # the loop ends with the connection, giving the thread back
    assert compute.submit(threading.get_ident).result(timeout=10) == compute_thread
    compute.shutdown()
