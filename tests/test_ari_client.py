"""The thin ARI client against the real Asterisk: errors, the event stream, reconnects."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kasuhara_ari.ari import CONNECTED, AriClient, AriError, AriUnavailable, ChannelGone
from kasuhara_ari.config import Config

pytestmark = pytest.mark.integration


def client(cfg: Config, **kw: object) -> AriClient:
    return AriClient(
        cfg.ari.url, cfg.ari.username, cfg.ari.password, f"kasuhara-test-{uuid.uuid4().hex[:6]}", **kw
    )  # type: ignore[arg-type]


async def test_info_and_gone_channel(asterisk: Config) -> None:
    async with client(asterisk) as ari:
        info = await ari.info()
        assert info["system"]["version"].startswith("22.")
        for call in (
            ari.hangup("no-such-channel"),
            ari.answer("no-such-channel"),
            ari.play("no-such-channel", "sound:beep"),
            ari.get_channel("no-such-channel"),
        ):
            with pytest.raises(ChannelGone):
                await call


async def test_add_missing_channel_to_bridge_is_channel_gone(asterisk: Config) -> None:
    async with client(asterisk) as ari:
        bridge = f"test-{uuid.uuid4().hex[:8]}"
        await ari.create_bridge(bridge)
        try:
            with pytest.raises(ChannelGone):
                await ari.add_to_bridge(bridge, "no-such-channel", absorb_dtmf=True)
        finally:
            await ari.destroy_bridge(bridge)


async def test_wrong_password_is_a_clear_error(asterisk: Config) -> None:
    async with AriClient(asterisk.ari.url, asterisk.ari.username, "wrong", "x") as ari:
        with pytest.raises(AriError, match="401"):
            await ari.info()


async def test_unreachable_asterisk() -> None:
    async with AriClient("http://127.0.0.1:9", "u", "p", "x", timeout=1) as ari:
        with pytest.raises(AriUnavailable):
            await ari.info()


async def test_event_stream_reconnects_after_the_connection_is_dropped(asterisk: Config) -> None:
    async with client(asterisk, reconnect_max_s=1) as ari:
        stream = ari.events()
        first = await asyncio.wait_for(anext(stream), 5)
        assert first["type"] == CONNECTED
        # The app is registered while connected.
        assert (await ari.application())["name"] == ari.app
        await ari.drop_event_connection()
        again = await asyncio.wait_for(anext(stream), 10)
        assert again["type"] == CONNECTED
        assert ari.reconnects == 1
        assert (await ari.application())["name"] == ari.app
        await stream.aclose()
