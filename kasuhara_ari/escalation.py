"""What the agent's key sequences do: call a supervisor in, flag the call, warn the caller, or end it.

Only the agent's digits count (the call passes only those in), and the agent joins the bridge with
``absorbDTMF`` so the caller never hears them. Which key means what is configuration; the decision is a pure
function of the digits and their timing (``KeySequenceCollector``), and the actions run inside the call's
own state machine so hangups are always seen.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from .announcement import PlayOutcome
from .ari import AriError, ChannelGone
from .events import now_iso
from .recording import Escalation

if TYPE_CHECKING:
    from .call import Call

log = logging.getLogger(__name__)

DTMF_DIGITS = frozenset("0123456789*#ABCD")
_END_EVENTS = frozenset({"ChannelHangupRequest", "ChannelDestroyed", "StasisEnd"})
#: Q.850 causes of a supervisor leg that ended before answering, as metadata and events name them.
_BUSY_CAUSES = frozenset({17})
_NO_ANSWER_CAUSES = frozenset({18, 19})


class KeySequenceCollector:
    """Turns single DTMF digits into configured sequences, with an inter-digit timeout.

    Digits that cannot start or continue any sequence are dropped (DTMF noise, an agent typing an
    extension), so ``5*9`` still triggers ``*9``. Configured sequences are prefix-free (checked when the
    config is loaded), so a match is never ambiguous and fires at once.
    """

    def __init__(self, keys: dict[str, str], *, inter_digit_timeout_s: float = 2.0) -> None:
        self.keys = dict(keys)
        self.timeout = inter_digit_timeout_s
        self._buffer = ""
        self._last = 0.0

    def feed(self, digit: str, now: float) -> tuple[str, str] | None:
        if len(digit) != 1 or digit not in DTMF_DIGITS:
            return None
        if self._buffer and now - self._last > self.timeout:
            self._buffer = ""
        self._last = now
        candidate = self._buffer + digit
        # Keep the longest suffix that is still the start of some sequence.
        while candidate and not any(seq.startswith(candidate) for seq in self.keys):
            candidate = candidate[1:]
        self._buffer = candidate
        if candidate in self.keys:
            self._buffer = ""
            return candidate, self.keys[candidate]
        return None

    def expire(self, now: float) -> tuple[str, str] | None:
        """Forget a half-typed sequence after the inter-digit timeout (never fires an action)."""
        if self._buffer and now - self._last > self.timeout:
            self._buffer = ""
        return None

    @property
    def pending(self) -> str:
        return self._buffer


class EscalationRunner:
    """Carries out agent actions for one call; at most one supervisor escalation at a time.

    While supervisors are being rung, the agent's other keys still act at once (a flag or a warning must
    not wait for a phone to stop ringing), a repeated ``*9`` does nothing, and a ``*3`` ends the call and
    the escalation with it. A supervisor leg's end is seen by its hangup events or by our own timer,
    whichever comes first (the final Dial status alone is not reliable).
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self._supervisor_legs: list[str] = []
        self._joined_leg: str | None = None
        self._dialstatus: dict[str, str] = {}  # supervisor leg -> last Dial status
        self._causes: dict[str, int] = {}  # supervisor leg -> Q.850 cause of its end
        self._destroyed: set[str] = set()
        self.supervisor_joined: str | None = None
        self.in_progress = False

    def channel_ids(self) -> list[str]:
        return list(self._supervisor_legs)

    def handover_state(self) -> dict[str, Any]:
        """What the next ``serve`` needs to carry on (a call is handed over only between escalations)."""
        return {
            "joined": self.supervisor_joined,
            "leg": self._joined_leg,
            "legs": list(self._supervisor_legs),
        }

    def resume(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`handover_state`: the joined supervisor stays joined, their leg ours."""
        legs = state.get("legs") or []
        self._supervisor_legs = [str(leg) for leg in legs if isinstance(leg, str)]
        leg, joined = state.get("leg"), state.get("joined")
        self._joined_leg = leg if isinstance(leg, str) and leg in self._supervisor_legs else None
        self.supervisor_joined = str(joined) if joined and self._joined_leg else None

    @property
    def supervisor_leg(self) -> str | None:
        """The leg of the supervisor who joined and is still in the call, if any."""
        return self._joined_leg

    def absorb(self, kind: str, channel_id: str, event: dict[str, Any]) -> None:
        """Facts about supervisor legs (the call keeps the general ones)."""
        if kind == "Dial":
            peer = str((event.get("peer") or {}).get("id", ""))
            if peer in self._supervisor_legs and event.get("dialstatus"):
                self._dialstatus[peer] = str(event["dialstatus"])
        elif kind in _END_EVENTS and channel_id in self._supervisor_legs:
            if kind == "ChannelDestroyed":
                self._destroyed.add(channel_id)
            if "cause" in event and (kind == "ChannelDestroyed" or channel_id not in self._causes):
                self._causes[channel_id] = int(event.get("cause") or 0)
            if channel_id == self._joined_leg:
                self._supervisor_left(channel_id)

    def _supervisor_left(self, leg: str) -> None:
        call = self.call
        supervisor = self.supervisor_joined
        self._joined_leg = None
        self.supervisor_joined = None
        log.info("escalation event=supervisor_left call_id=%s leg=%s", call.call_id, leg)
        call.emit("supervisor_left", supervisor=supervisor)

    async def handle(self, key: str, action: str) -> bool:
        """Run one action; True when it ended the call."""
        call = self.call
        log.info("escalation event=key call_id=%s key=%s action=%s", call.call_id, key, action)
        if action == "supervisor":
            if self.in_progress or self.supervisor_joined:
                log.info("escalation event=already_escalated call_id=%s", call.call_id)
                return False
            return await self._supervisor(key)
        if action == "flag":
            return await self._flag(key)
        if action == "warn":
            return await self._warn(key, hang_up=False)
        if action == "warn_and_hangup":
            return await self._warn(key, hang_up=True)
        log.warning("escalation event=unknown_action call_id=%s action=%s", call.call_id, action)
        return False

    async def _flag(self, key: str) -> bool:
        """Evidence: the flag goes into the metadata, and a durable hold request is written at once so
        that even a crash before the end of the call cannot lose it. The agent's confirmation tone is
        started first: the hold request may wait on a disk or S3, the agent should not."""
        call = self.call
        await self._acknowledge(call.deps.cfg.escalation.flag_ack_sound, tag=f"{call.call_id}-flagack")
        await self.hold_as_evidence(key=key, by="agent", reason="flagged by agent as harassment")
        return False

    async def hold_as_evidence(self, *, key: str, by: str, reason: str) -> None:
        """The call becomes evidence: the ``harassment`` flag, a durable hold request at once (a crash
        before the end of the call cannot lose it), the escalation record and the ``flagged`` event.
        ``by``: ``agent`` (a key) or ``detector`` (detection in act mode, ``key`` names the detection)."""
        call = self.call
        at = now_iso()
        if "harassment" not in call.record.flags:
            call.record.flags.append("harassment")
        if call.record.hold is None:
            call.record.hold = {"reason": reason, "by": by, "at": at}
        result = "flagged"
        if call.deps.hold is not None:
            try:
                await call.deps.hold(call.call_id, reason, by, call.record.started_at)
            except Exception as exc:
                log.error("escalation event=hold_request_failed call_id=%s error=%s", call.call_id, exc)
                result = "flagged (hold pending upload)"
        call.add_escalation(Escalation(at=at, action="flag", key=key, by=by, result=result))
        call.emit("flagged", key=key, by=by, reason="harassment", at=at)

    async def _acknowledge(self, sound: str, *, tag: str) -> None:
        """A short tone for the agent alone that the key was accepted (every time: a second ``*1`` is
        confirmed too). Played on the agent's channel, so neither the caller nor the recording (MixMonitor
        on the caller's channel) hears it; never waited for, never fails the action."""
        call = self.call
        if sound and call.agent_id and not call.channel_gone(call.agent_id):
            await call.deps.notices.cue(call.agent_id, sound, tag=tag)

    async def _warn(self, key: str, *, hang_up: bool) -> bool:
        call = self.call
        cfg = call.deps.cfg.escalation
        sound = cfg.final_sound if hang_up else cfg.warning_sound
        at = now_iso()
        outcome = await self._play_on_bridge(sound, tag=f"{call.call_id}-warn")
        result = outcome.value
        call.add_escalation(
            Escalation(
                at=at, action="warn_and_hangup" if hang_up else "warn", key=key, by="agent", result=result
            )
        )
        call.emit("warning_played", key=key, sound=sound, final=hang_up, result=result)
        if hang_up:
            call.record.end_reason = "warn_and_hangup"
            with contextlib.suppress(AriError):
                await call.deps.ari.hangup(call.caller.id)
            return True
        return False

    async def _play_on_bridge(self, sound: str, *, tag: str) -> PlayOutcome:
        """Both parties hear it, and so does the recording (MixMonitor is on the caller's channel)."""
        call = self.call
        return await call.deps.notices.play_on_bridge(
            call, call.bridge_id, sound, tag=tag, parties=(call.caller.id, call.agent_id or "")
        )

    async def _supervisor(self, key: str) -> bool:
        """Ring supervisors in order; the first who answers hears the intro and joins the bridge. The agent
        hears the confirmation tone before the first leg is even created."""
        call = self.call
        cfg = call.deps.cfg.escalation
        self.in_progress = True
        # One reading of the clock for the event and the metadata's escalation entry: a test (and an
        # auditor) compares them, and two readings may differ by a millisecond.
        requested_at = call.emit(
            "escalation_requested", key=key, by="agent", supervisors=list(cfg.supervisors)
        )
        await self._acknowledge(cfg.supervisor_ack_sound, tag=f"{call.call_id}-supack")
        from .call import CallState  # local: call imports this module

        call._set_state(CallState.ESCALATING)
        try:
            for index, endpoint in enumerate(cfg.supervisors, start=1):
                leg = f"{call.call_id}-sup-{len(self._supervisor_legs) + 1}"
                self._supervisor_legs.append(leg)
                if call.deps.claim_channel is not None:
                    call.deps.claim_channel(leg, call)
                call.emit("supervisor_ringing", supervisor=endpoint, attempt=index)
                outcome = await self._ring_one(endpoint, leg, cfg.ring_timeout_s, key=key)
                if outcome == "answered":
                    self._joined_leg = leg
                    self.supervisor_joined = endpoint
                    call.add_escalation(
                        Escalation(
                            at=requested_at,
                            action="supervisor",
                            key=key,
                            by="agent",
                            supervisor=endpoint,
                            result="joined",
                        )
                    )
                    call.emit("supervisor_joined", supervisor=endpoint, attempt=index)
                    return False
                if outcome == "call_ended":
                    call.add_escalation(
                        Escalation(
                            at=requested_at, action="supervisor", key=key, by="agent", result="call_ended"
                        )
                    )
                    return True
                log.info(
                    "escalation event=supervisor_missed call_id=%s supervisor=%s reason=%s",
                    call.call_id,
                    endpoint,
                    outcome,
                )
                call.emit("supervisor_missed", supervisor=endpoint, attempt=index, reason=outcome)
            call.add_escalation(
                Escalation(at=requested_at, action="supervisor", key=key, by="agent", result="unavailable")
            )
            call.emit("supervisor_unavailable", supervisors=list(cfg.supervisors))
            if call.agent_id and not call.channel_gone(call.agent_id):
                await call.deps.notices.play(
                    call, call.agent_id, cfg.unavailable_sound, tag=f"{call.call_id}-nosup"
                )
            return False
        finally:
            self.in_progress = False
            # A *9 pressed again while this escalation ran is not a new request.
            call._pending_actions[:] = [a for a in call._pending_actions if a[1] != "supervisor"]
            if not (call.channel_gone(call.caller.id) or call.channel_gone(call.agent_id or "")):
                call._set_state(CallState.TALKING)

    async def _ring_one(self, endpoint: str, leg: str, ring_timeout_s: int, *, key: str = "") -> str:
        """``answered``, ``call_ended``, or why this supervisor did not come: ``no_answer``, ``busy``,
        ``failed``, ``hung_up`` (answered, then left during the intro)."""
        call = self.call
        ari: Any = call.deps.ari
        try:
            steps = [time.monotonic()]
            shown = call.leg_caller_id("escalation", key=key)
            await ari.create_channel(
                endpoint,
                channel_id=leg,
                app_args=f"supervisor,{call.call_id}",
                originator=call.caller.id,
                variables={
                    "KASUHARA_CALL_ID": call.call_id,
                    "KASUHARA_ROLE": "supervisor",
                    **shown.variables(),
                },
            )
            steps.append(time.monotonic())
            await call.until_in_stasis(leg)
            steps.append(time.monotonic())
            # In the bridge before it rings, so early media (if any) reaches the call at once; its own
            # digits are absorbed like the agent's.
            await ari.add_to_bridge(call.bridge_id, leg, absorb_dtmf=True, role="supervisor")
            steps.append(time.monotonic())
            # Dialling "from" the agent would copy the agent's own caller ID over the one set above (an
            # agent leg the app created has none: the supervisor saw "Anonymous").
            await ari.dial(leg, caller=None if shown else call.agent_id, timeout_s=ring_timeout_s)
            dialled = time.monotonic()
            create_ms, stasis_ms, add_ms, dial_ms = (
                round((b - a) * 1000, 1) for a, b in zip(steps, [*steps[1:], dialled], strict=True)
            )
            log.info(
                "escalation event=supervisor_dialled call_id=%s leg=%s create_ms=%s stasis_ms=%s add_ms=%s "
                "dial_ms=%s",
                call.call_id,
                leg,
                create_ms,
                stasis_ms,
                add_ms,
                dial_ms,
            )
        except ChannelGone:
            await self._drop(leg)
            return "call_ended" if self._call_over() else "failed"
        except AriError as exc:
            log.error("escalation event=supervisor_dial_failed call_id=%s error=%s", call.call_id, exc)
            await self._drop(leg)
            return "failed"
        deadline = time.monotonic() + ring_timeout_s + 2
        while not call.channel_up(leg):
            if self._call_over() or await self._other_keys():
                await self._drop(leg)
                return "call_ended"
            if call.channel_gone(leg):
                rang_s = time.monotonic() - dialled
                return await self._why_missed(leg, rang_s=rang_s, timeout_s=ring_timeout_s)
            if time.monotonic() > deadline:
                await self._drop(leg)
                return "no_answer"
            await call.next_event(timeout=0.25)
        cfg = call.deps.cfg.escalation
        await call.deps.notices.play(call, leg, cfg.supervisor_intro_sound, tag=f"{call.call_id}-supintro")
        if self._call_over():
            await self._drop(leg)
            return "call_ended"
        return "answered" if not call.channel_gone(leg) else "hung_up"

    def _call_over(self) -> bool:
        call = self.call
        return call.channel_gone(call.caller.id) or call.channel_gone(call.agent_id or "")

    async def _other_keys(self) -> bool:
        """Act on keys the agent completed while a supervisor rings; True when one ended the call."""
        while (pending := self.call.take_agent_action()) is not None:
            key, action = pending
            if action == "supervisor":
                log.info("escalation event=already_escalating call_id=%s", self.call.call_id)
                continue
            if await self.handle(key, action):
                return True
        return False

    async def _why_missed(self, leg: str, *, rang_s: float, timeout_s: int) -> str:
        """The leg ended before answering: the Dial status when Asterisk gave one, else the hangup cause,
        else our own clock (ARI's dial timeout hangs the leg up with no NOANSWER status)."""
        call = self.call
        wait_until = time.monotonic() + 1.0  # the destruction (with its cause) follows the hangup request
        while leg not in self._destroyed and time.monotonic() < wait_until:
            await call.next_event(timeout=0.2)
        status, cause = self._dialstatus.get(leg, ""), self._causes.get(leg, 0)
        if status == "BUSY" or (status in ("", "CANCEL") and cause in _BUSY_CAUSES):
            return "busy"
        if status == "NOANSWER" or (status in ("", "CANCEL") and cause in _NO_ANSWER_CAUSES):
            return "no_answer"
        if rang_s >= timeout_s - 0.5:
            return "no_answer"
        log.info("escalation event=leg_failed call_id=%s status=%s cause=%s", call.call_id, status, cause)
        return "failed"

    async def _drop(self, leg: str) -> None:
        if self.call.channel_gone(leg):
            return
        with contextlib.suppress(AriError):
            await self.call.deps.ari.hangup(leg)
