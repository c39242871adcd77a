"""A TCP proxy on 127.0.0.1 that can break the network between client and server.

Real faults need a real network path: the proxy forwards bytes both ways and,
on request, holds them (a blackhole: queries and connects hang), resets every
connection (RST), refuses new ones, or adds latency.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["TcpProxy", "open_tcp_proxy"]

_CHUNK = 65536


class TcpProxy:
    """Forward 127.0.0.1:`port` to `target_host`:`target_port`, with fault switches.

    Run it with ``await nursery.start(proxy.run)`` (or `open_tcp_proxy`).  The
    switches act at once on current and new connections.
    """

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._blackholed = False
        self._healed = trio.Event()
        self._refusing = False
        self._delay = 0.0
        self._links: dict[trio.CancelScope, trio.SocketStream] = {}

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    def blackhole(self) -> None:
        """Hold every byte in both directions until `heal` (nothing is dropped)."""
        if not self._blackholed:
            self._blackholed = True
            self._healed = trio.Event()

    def reset_all(self) -> None:
        """Close every current connection with a TCP reset."""
        for scope, client in list(self._links.items()):
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            scope.cancel()

    def refuse_new(self, refuse: bool = True) -> None:
        """Close new connections as soon as they are accepted."""
        self._refusing = refuse

    def set_delay(self, seconds: float) -> None:
        """Add `seconds` of latency to every chunk forwarded."""
        self._delay = seconds

    def heal(self) -> None:
        """Back to plain forwarding (no blackhole, no refusal, no delay)."""
        self._blackholed = False
        self._healed.set()
        self._refusing = False
        self._delay = 0.0

    async def run(
        self, *, task_status: trio.TaskStatus[TcpProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on a free port, report ``started(self)``, and serve until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started(self)

    async def _serve(self, client: trio.SocketStream) -> None:
        async with client:
            if self._refusing:
                return
            try:
                server = await trio.open_tcp_stream(self.target_host, self.target_port)
            except OSError:
                return
            async with server:
                with trio.CancelScope() as scope:  # noqa: ASYNC912  # the nursery inside waits
                    self._links[scope] = client
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                            nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
                    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    finally:
                        del self._links[scope]

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, link: trio.CancelScope
    ) -> None:
        while data := await source.receive_some(_CHUNK):
            while self._blackholed:
                await self._healed.wait()
            if self._delay:
                await trio.sleep(self._delay)
            await sink.send_all(data)
        link.cancel()  # one side closed: close the other


@asynccontextmanager
async def open_tcp_proxy(target_host: str, target_port: int) -> AsyncIterator[TcpProxy]:
    """``async with open_tcp_proxy(host, port) as proxy:`` -- a running `TcpProxy`."""
    async with trio.open_nursery() as nursery:
        proxy: TcpProxy = await nursery.start(TcpProxy(target_host, target_port).run)
        yield proxy
        nursery.cancel_scope.cancel()
