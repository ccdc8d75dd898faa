"""The MQTT client never hands the loop a socket that paho already closed (aiomqtt's race)."""

from __future__ import annotations

import asyncio
import inspect
import socket
from typing import Any

import aiomqtt

from kasuhara_ari import mqtt_client


async def _race(cls: type[aiomqtt.Client]) -> tuple[list[dict[str, Any]], bool, bool]:
    """Replay what paho does when the broker drops the link at once, before the loop catches up.

    paho's thread opens the socket and asks for read and write interest; the socket is closed
    before the loop runs those requests. Returns the loop's unhandled errors and whether a
    reader or writer is still registered on the descriptor.
    """
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    client = cls("127.0.0.1", 1)
    paho = client._client
    a, b = socket.socketpair()
    fd = a.fileno()

    def paho_thread() -> tuple[socket.socket, socket.socket]:
        # All of it before the loop gets to run what paho scheduled:
        client._on_socket_open(paho, None, a)
        client._on_socket_register_write(paho, None, a)
        client._on_socket_unregister_write(paho, None, a)  # paho's _sock_close
        client._on_socket_close(paho, None, a)
        a.close()
        # The descriptor number is reused at once by the next socket the process opens.
        return socket.socketpair()

    try:
        c, d = await asyncio.to_thread(paho_thread)
        for _ in range(5):
            await asyncio.sleep(0)
        reused = fd in (c.fileno(), d.fileno())
        assert reused, "the test needs the descriptor reused to show a stale registration"
        reader = loop.remove_reader(fd)
        writer = loop.remove_writer(fd)
        c.close()
        d.close()
    finally:
        a.close()
        b.close()
        if client._misc_task is not None:
            client._misc_task.cancel()
    return errors, bool(reader), bool(writer)


async def test_a_socket_closed_before_the_loop_runs_is_never_registered() -> None:
    errors, reader, writer = await _race(mqtt_client.Client)
    assert errors == []
    assert not reader and not writer


async def test_plain_aiomqtt_shows_the_race_this_client_closes() -> None:
    """The control: aiomqtt's own client registers the stale descriptor (a reused one) or fails."""
    errors, reader, writer = await _race(aiomqtt.Client)
    assert errors or reader or writer


async def test_an_open_socket_is_still_registered() -> None:
    loop = asyncio.get_running_loop()
    client = mqtt_client.Client("127.0.0.1", 1)
    paho = client._client
    a, b = socket.socketpair()
    try:
        await asyncio.to_thread(client._on_socket_open, paho, None, a)
        await asyncio.to_thread(client._on_socket_register_write, paho, None, a)
        for _ in range(5):
            await asyncio.sleep(0)
        assert loop.remove_reader(a.fileno()) and loop.remove_writer(a.fileno())
    finally:
        if client._misc_task is not None:
            client._misc_task.cancel()
        a.close()
        b.close()


def test_aiomqtt_still_has_what_the_guard_wraps() -> None:
    """An aiomqtt upgrade that renamed these would silently drop the guard: fail here instead."""
    for name in ("_on_socket_open", "_on_socket_close", "_on_socket_register_write"):
        assert name in aiomqtt.Client.__dict__, name
    assert "self._loop = asyncio.get_running_loop()" in inspect.getsource(aiomqtt.Client.__init__)
