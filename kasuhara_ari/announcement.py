"""Playing prompts (the recording notice, apologies, warnings) and waiting for them to finish.

A playback ends with ``PlaybackFinished``, but the channel may hang up first: every wait here is raced
against the call's own view of hangups, so a caller who hangs up during the notice is never waited on.
A *cue* (the agent's confirmation tones) is the exception: started and not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from typing import Any, Protocol

from .ari import AriError, ChannelGone

log = logging.getLogger(__name__)


class PlayOutcome(enum.Enum):
    FINISHED = "finished"
    HUNG_UP = "hung_up"
    FAILED = "failed"


class PlaybackApi(Protocol):
    async def play(
        self, channel_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> dict[str, Any]: ...

    async def stop_playback(self, playback_id: str) -> None: ...

    async def play_on_bridge(
        self, bridge_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> dict[str, Any]: ...


class Waiter(Protocol):
    """The call's event loop: wait until a playback finished or the channel went away."""

    def playback_state(self, playback_id: str) -> str | None:
        """``done``/``failed``/``cancelled`` once PlaybackFinished arrived, else None."""
        ...

    def channel_gone(self, channel_id: str) -> bool: ...

    async def next_event(self, timeout: float | None) -> bool:
        """Absorb one more event into the call's state; False on timeout."""
        ...


def sound_media(sound: str) -> str:
    """``kasuhara/recording-notice`` → ``sound:kasuhara/recording-notice`` (config holds Asterisk names)."""
    if sound.startswith(("sound:", "recording:", "tone:", "digits:", "number:")):
        return sound
    return f"sound:{sound}"


class NoticePlayer:
    def __init__(
        self, ari: PlaybackApi, language: str, *, max_prompt_s: float = 60.0, cue_timeout_s: float = 1.0
    ) -> None:
        self._ari = ari
        self.language = language
        self.max_prompt_s = max_prompt_s
        self.cue_timeout_s = cue_timeout_s

    async def cue(self, channel_id: str, sound: str, *, tag: str) -> str | None:
        """Start ``sound`` on ``channel_id`` and return at once (the playback id; None if not started).

        For the agent's key confirmations: the tone must start before the action's slow parts (a hold
        request, ringing supervisors), and a lost tone must never cost the action itself, so nothing is
        waited on but the request (bounded by ``cue_timeout_s``) and no error is raised. Its
        PlaybackFinished still reaches the call and is merely remembered there, like any other.
        """
        if not sound:
            return None
        playback_id = f"{tag}-{uuid.uuid4().hex[:12]}"
        try:
            async with asyncio.timeout(self.cue_timeout_s):
                await self._ari.play(
                    channel_id, sound_media(sound), lang=self.language, playback_id=playback_id
                )
        except ChannelGone:
            log.info("announcement event=cue_channel_gone channel=%s sound=%s", channel_id, sound)
            return None
        except TimeoutError:
            log.warning(
                "announcement event=cue_slow channel=%s sound=%s timeout_s=%s",
                channel_id,
                sound,
                self.cue_timeout_s,
            )
            return None
        except AriError as exc:
            log.error("announcement event=cue_failed channel=%s sound=%s error=%s", channel_id, sound, exc)
            return None
        return playback_id

    async def play(self, waiter: Waiter, channel_id: str, sound: str, *, tag: str) -> PlayOutcome:
        """Play ``sound`` to ``channel_id`` and wait until it finished or the channel is gone."""
        playback_id = f"{tag}-{uuid.uuid4().hex[:12]}"
        try:
            await self._ari.play(channel_id, sound_media(sound), lang=self.language, playback_id=playback_id)
        except ChannelGone:
            return PlayOutcome.HUNG_UP
        except AriError as exc:
            log.error("announcement event=play_failed channel=%s sound=%s error=%s", channel_id, sound, exc)
            return PlayOutcome.FAILED
        deadline = time.monotonic() + self.max_prompt_s
        while (state := waiter.playback_state(playback_id)) is None:
            if waiter.channel_gone(channel_id):
                return PlayOutcome.HUNG_UP
            if time.monotonic() >= deadline:
                log.error("announcement event=stuck channel=%s sound=%s", channel_id, sound)
                with contextlib.suppress(AriError):
                    await self._ari.stop_playback(playback_id)
                return PlayOutcome.FAILED
            await waiter.next_event(timeout=deadline - time.monotonic())
        if waiter.channel_gone(channel_id):
            return PlayOutcome.HUNG_UP
        if state != "done":
            log.error("announcement event=playback_%s channel=%s sound=%s", state, channel_id, sound)
            return PlayOutcome.FAILED
        return PlayOutcome.FINISHED

    async def play_on_bridge(
        self, waiter: Waiter, bridge_id: str, sound: str, *, tag: str, parties: tuple[str, ...]
    ) -> PlayOutcome:
        """Play ``sound`` to everyone in the bridge (and so into the recording); wait until it finished
        or one of ``parties`` hung up."""
        playback_id = f"{tag}-{uuid.uuid4().hex[:12]}"
        try:
            await self._ari.play_on_bridge(
                bridge_id, sound_media(sound), lang=self.language, playback_id=playback_id
            )
        except AriError as exc:
            log.error(
                "announcement event=bridge_play_failed bridge=%s sound=%s error=%s", bridge_id, sound, exc
            )
            return PlayOutcome.FAILED
        deadline = time.monotonic() + self.max_prompt_s
        while (state := waiter.playback_state(playback_id)) is None:
            if any(waiter.channel_gone(p) for p in parties):
                return PlayOutcome.HUNG_UP
            if time.monotonic() >= deadline:
                with contextlib.suppress(AriError):
                    await self._ari.stop_playback(playback_id)
                return PlayOutcome.FAILED
            await waiter.next_event(timeout=deadline - time.monotonic())
        return PlayOutcome.FINISHED if state == "done" else PlayOutcome.FAILED
