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
import pickle
import threading
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener

logger = logging.getLogger(__name__)


class ChannelClosed(ConnectionError):
    """The worker's end went away (its process died or closed the channel)."""


class StepServer:
    """Worker side: accepts one connection (its replica's) and answers each message with `handle(message)`;
    `handle`'s exception travels back as ("error", traceback text).

    The loop runs on a thread of its own, or, with `start` (e.g. an executor's `submit`), on the thread `start`
    runs it on: the worker's compute thread, so that a step runs where its message arrived. Handing each step to
    another thread and its result back cost two thread wake-ups a step, each waiting for a core that the forward's
    OpenMP threads were still spinning on."""

    def __init__(self, host: str, handle: Callable[[object], object],
                 start: Callable[[Callable[[], None]], object] | None = None):
        self.key = os.urandom(32)
        self._listener = Listener((host, 0), authkey=self.key)
        self.address = self._listener.address  # (host, port)
        self._handle = handle
        if start is None:
            threading.Thread(target=self._serve, name="shardserve-steps", daemon=True).start()
        else:
            start(self._serve)

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
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    return  # the replica went away
                try:
                    reply = ("ok", self._handle(message))
                except BaseException:  # noqa: BLE001 - every failure goes back to the replica, which decides
                    reply = ("error", traceback.format_exc())
                try:
                    # plain pickle, not Connection.send's ForkingPickler: that one hands a torch tensor (a score's
                    # logits) over as a file descriptor to fetch from this process, which the replica cannot do
                    conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
                except OSError:
                    return


class StepClient:
    """Replica side of one worker's channel, used from the router's event loop. Messages may be sent before the
    replies to earlier ones arrive (the next step goes out while one runs): the worker answers in order, and each
    `send` returns the future of its own reply, which one reader, watching the socket for the channel's life, fills."""

    def __init__(self, address: tuple[str, int], key: bytes):
        self.conn: Connection = Client(tuple(address), authkey=key)
        self._waiting: deque[asyncio.Future] = deque()  # one per message sent and not yet answered, in order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: ChannelClosed | None = None

    async def call(self, message: bytes) -> object:
        """Send `message` (already pickled: one plan goes to every rank) and wait for the reply without blocking
        the event loop; ChannelClosed if the worker's end closes, RuntimeError carrying its traceback if it failed."""
        return await self.send(message)

    def send(self, message: bytes) -> asyncio.Future:
        """Send at once (a caller on a busy event loop, which the HTTP app shares, hands the worker its step before
        anything else the loop has queued runs); returns the future of the reply."""
        if self._closed is not None:
            raise self._closed
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the first send, or a new event loop (asyncio.run per call, in tests)
            if self._waiting:
                raise RuntimeError("step channel: replies are still awaited on another event loop")
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.conn.fileno())
            self._loop = loop
            loop.add_reader(self.conn.fileno(), self._readable)
            # uvloop (Ray's actors run on it) makes a watched fd non-blocking; a reply larger than the socket's
            # buffer (a score's logits) then reads as BlockingIOError halfway. Each reply is read whole once it
            # starts arriving: the worker writes it in one go.
            os.set_blocking(self.conn.fileno(), True)
        try:
            self.conn.send_bytes(message)
        except OSError as e:
            raise ChannelClosed(f"the worker's process died or closed its step channel ({e!r})") from e
        reply = self._loop.create_future()
        self._waiting.append(reply)
        return reply

    def _readable(self) -> None:
        """Every reply that has arrived goes to the oldest waiting future (one a caller gave up on is skipped)."""
        try:
            while True:
                status, value = pickle.loads(self.conn.recv_bytes())
                reply = self._waiting.popleft() if self._waiting else None
                if reply is not None and not reply.done():
                    if status == "error":
                        reply.set_exception(RuntimeError(value))
                    else:
                        reply.set_result(value)
                if not self.conn.poll(0):
                    return
        except (EOFError, OSError) as e:
            self._fail(ChannelClosed(f"the worker's process died or closed its step channel ({e!r})"))

    def _fail(self, error: ChannelClosed) -> None:
        self._closed = error
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
        while self._waiting:
            reply = self._waiting.popleft()
            if not reply.done():
                reply.set_exception(error)

    def close(self) -> None:
        """Close the channel; replies still awaited fail with ChannelClosed. From any thread: the socket is
        unwatched and closed on the event loop's (the replica's shutdown runs in a thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.conn.close()
            return

        def on_loop() -> None:
            if self._closed is None:
                self._fail(ChannelClosed("the replica closed the step channel"))
            self.conn.close()

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            on_loop()
        else:
            loop.call_soon_threadsafe(on_loop)
