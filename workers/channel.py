"""The step channel: one authenticated connection from a replica to each of its workers, carrying every step's plan
in and each rank's result out, with no Ray call per step.

A Ray actor call per step cost 2.6 ms a round trip at batch 1 on 2 cores (the router's submission, the worker's
task machinery and the reply, each a few hundred microseconds that the worker's compute threads delay further);
a Ray Compiled Graph cut it to 0.6 ms but its channels poll, which slowed the forward by more (replica.py). Here a
step is a pickled message each way over a socket the worker waits on in the kernel (no polling).

The worker listens on its node's address on a free port (`StepServer`) and hands the port and a random key to the
replica through a Ray call; the connection proves the key with multiprocessing.connection's HMAC challenge before
either side unpickles a byte, so nothing that merely reaches the port can send the worker a pickle. A worker that
dies closes its end (the replica reads EOF at once); one that hangs is caught by the replica's step timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener

logger = logging.getLogger(__name__)


class ChannelClosed(ConnectionError):
    """The worker's end went away (its process died or closed the channel)."""


class StepServer:
    """Worker side: accepts one connection (its replica's) and answers each message with `handle(message)`, on a
    thread of its own; `handle`'s exception travels back as ("error", traceback text)."""

    def __init__(self, host: str, handle: Callable[[object], object]):
        self.key = os.urandom(32)
        self._listener = Listener((host, 0), authkey=self.key)
        self.address = self._listener.address  # (host, port)
        self._handle = handle
        self._thread = threading.Thread(target=self._serve, name="shardserve-steps", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn = self._listener.accept()  # raises AuthenticationError for a peer without the key
        except Exception as e:  # noqa: BLE001
            logger.error("step channel: refused a connection: %s", e)
            return
        finally:
            self._listener.close()  # one replica per worker: nobody else may connect afterwards
        with conn:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return  # the replica went away
                try:
                    reply = ("ok", self._handle(message))
                except BaseException:  # noqa: BLE001 - every failure goes back to the replica, which decides
                    reply = ("error", traceback.format_exc())
                try:
                    conn.send(reply)
                except OSError:
                    return


class StepClient:
    """Replica side of one worker's channel, used from the router's event loop."""

    def __init__(self, address: tuple[str, int], key: bytes):
        self.conn: Connection = Client(tuple(address), authkey=key)

    async def call(self, message: bytes) -> object:
        """Send `message` (already pickled: one plan goes to every rank) and wait for the reply without blocking
        the event loop; ChannelClosed if the worker's end closes, RuntimeError carrying its traceback if it failed."""
        self.send(message)
        return await self.reply()

    def send(self, message: bytes) -> None:
        """The send half of `call`, at once: a caller on a busy event loop (the HTTP app shares the router's) hands
        the worker its step before anything else the loop has queued runs."""
        try:
            self.conn.send_bytes(message)
        except OSError as e:
            raise ChannelClosed(f"the worker's process died or closed its step channel ({e!r})") from e

    async def reply(self) -> object:
        """The reply to what `send` sent (the wait half of `call`)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError) as e:
            raise ChannelClosed(f"the worker's process died or closed its step channel ({e!r})") from e
        if status == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        self.conn.close()
