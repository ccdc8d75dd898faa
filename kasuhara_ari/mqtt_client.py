"""The one place MQTT clients are made: aiomqtt's Client, minus a socket race.

aiomqtt hands paho's socket to the event loop with ``call_soon_threadsafe(loop.add_reader/
add_writer, fd, ...)``. When the broker drops the connection at once (a TLS listener that
wants a client certificate, a refused login), paho can close the socket before the loop
runs those calls. The loop then registers a closed descriptor: asyncio prints a traceback
("Exception in callback ... Bad file descriptor") on a CLI's stderr, and if the number has
already been reused by another socket, the loop watches the wrong socket. This client
records which descriptor paho has open and registers only that one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import aiomqtt

__all__ = ["Client"]


class _OpenSocket:
    """The descriptor paho has open right now, shared by paho's thread and the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1

    def opened(self, fd: int) -> None:
        with self._lock:
            self._fd = fd

    def closed(self) -> None:
        with self._lock:
            self._fd = -1

    def is_open(self, fd: int) -> bool:
        with self._lock:
            return fd >= 0 and fd == self._fd


class _GuardedLoop:
    """The running loop, except that add_reader/add_writer skip a descriptor paho closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: _OpenSocket) -> None:
        self._real = loop
        self._sock = sock

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        if self._sock.is_open(fd):
            self._real.add_reader(fd, callback, *args)

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        if self._sock.is_open(fd):
            self._real.add_writer(fd, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Client(aiomqtt.Client):
    """aiomqtt.Client that never hands the loop a socket paho has already closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open_socket = _OpenSocket()
        self._loop = _GuardedLoop(self._loop, self._open_socket)  # type: ignore[assignment]

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._open_socket.opened(sock.fileno())
        super()._on_socket_open(client, userdata, sock)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self._open_socket.closed()
        super()._on_socket_close(client, userdata, sock)
