"""An outbound call: the agent dials a customer through ``Stasis(kasuhara,outbound,TARGET)``.

The customer is the one who must hear the notice and whose leg is recorded, exactly as an inbound caller:
so once the customer's leg exists it takes the place of ``Call.caller`` and the rest of the call (talking,
escalation, teardown, metadata) is the inbound call's. Only the beginning differs:

ringing (the agent hears ringback while the customer's phone rings) → customer answers → recording starts
on the customer's leg → notice to the customer → the agent is answered and both meet in the bridge.
"""

from __future__ import annotations

import logging
import time

from . import metrics
from .announcement import PlayOutcome
from .ari import AriError, Channel, ChannelGone
from .call import NOTICE_VAR, Call, CallDeps, CallState, _iso
from .callerid import CallerId, agent_label, dialled_number, render
from .events import now_iso

log = logging.getLogger(__name__)


class OutboundCall(Call):
    def __init__(self, deps: CallDeps, agent: Channel, call_id: str, target: str) -> None:
        super().__init__(deps, agent, call_id, target, direction="outbound")
        self.agent_channel = agent
        self.agent_id = agent.id
        self.record.agent = agent.name
        # The customer's leg does not exist yet; its id is ours to choose, so events can be routed to it
        # from the first one on.
        self.caller = Channel(f"{call_id}-customer", "", "Down", "", "", "")

    async def _steps(self) -> None:
        """The outbound call's beginning; from the bridge on it is the inbound call's."""
        ari = self.deps.ari
        cfg = self.deps.cfg
        agent = self.agent_channel.id
        self.emit("started", direction="outbound", caller=self._caller_dict(), target=self.target)
        await self._quietly(ari.ring(agent))
        self._set_state(CallState.DIALLING)
        await ari.create_bridge(self.bridge_id, name=self.bridge_id)
        if not await self._dial_customer():
            return

        # The customer answered: record from now on, then the notice, before the agent is connected.
        self._set_state(CallState.ANSWERING)
        self._answered_wall = time.time()
        self.record.answered_at = _iso(self._answered_wall)
        await self._start_recording()
        self._set_state(CallState.NOTICE)
        outcome = await self.deps.notices.play(
            self, self.caller.id, cfg.announcement.sound, tag=f"{self.call_id}-notice"
        )
        if self.channel_gone(self.caller.id):
            self.record.end_reason = "customer_hungup_during_notice"
            return
        if self.channel_gone(agent):
            self.record.end_reason = "agent_hungup"
            return
        if outcome is PlayOutcome.FINISHED:
            self.record.notice_played = True
            self.emit("notice_played", sound=cfg.announcement.sound, language=cfg.announcement.language)
            await self._quietly(ari.set_variable(self.caller.id, f"__{NOTICE_VAR}", "1"))
        else:
            log.error("call event=notice_failed call_id=%s", self.call_id)
            metrics.NOTICE_FAILURES.inc()

        await ari.answer(agent)
        # How `kasuhara supervise` finds the agent's leg in the bridge.
        await self._quietly(ari.set_variable(agent, "KASUHARA_ROLE", "agent"))
        await ari.add_to_bridge(self.bridge_id, self.caller.id)
        await ari.add_to_bridge(self.bridge_id, agent, absorb_dtmf=True, role="agent")
        self.record.agent_answered_at = now_iso()
        self.emit("agent_answered", agent=self.agent_channel.name)
        self._set_state(CallState.TALKING)
        await self._start_media()  # the customer's voice to the detectors (detection.loudness)
        await self._talk()

    def leg_caller_id(self, kind: str, **extra: str) -> CallerId:
        """As the inbound call's, but the customer is the one rung: their number is the dialled one."""
        cfg = self.deps.cfg.callerid
        agent = self.agent_channel
        fields = {
            "agent": agent_label(agent.name),
            "agent_number": agent.caller_number,
            "agent_name": agent.caller_name,
            "caller_number": dialled_number(self.target),
            "customer_number": dialled_number(self.target),
            "call_id": self.call_id,
            **extra,
        }
        return render(getattr(cfg, f"{kind}_name"), getattr(cfg, f"{kind}_number"), fields)

    def _caller_dict(self) -> dict[str, str]:
        return {"number": self.record.caller_number, "name": self.record.caller_name}

    async def _dial_customer(self) -> bool:
        """Ring the customer; True once answered. The agent hears the outcome as a hangup cause."""
        ari = self.deps.ari
        customer_id = self.caller.id
        agent = self.agent_channel.id
        if self.deps.claim_channel is not None:
            self.deps.claim_channel(customer_id, self)
        try:
            shown = self.leg_caller_id("outbound")
            created = await ari.create_channel(
                self.target,
                channel_id=customer_id,
                app_args=f"customer,{self.call_id}",
                originator=agent,
                variables={
                    "KASUHARA_CALL_ID": self.call_id,
                    "KASUHARA_ROLE": "customer",
                    **shown.variables(),
                },
            )
        except ChannelGone:
            raise
        except AriError as exc:
            log.error("call event=customer_create_failed call_id=%s error=%s", self.call_id, exc)
            self.record.end_reason = "customer_unreachable"
            await self._quietly(ari.hangup(agent, "congestion"))
            return False
        self.caller = created
        # Dial before its StasisStart answers 409 "not in Stasis": the REST lanes make that race common
        # (create and dial may go over different websockets, which Asterisk serves in different threads).
        await self.until_in_stasis(customer_id)
        timeout = self.deps.cfg.routing.dial_timeout_s
        # Dialling "from" the agent copies the agent's caller ID onto the customer's leg (what it showed
        # before templates existed); a configured [callerid] outbound template must not be overwritten.
        if not shown:
            await self.repair_presented_id(self.agent_channel)
        await ari.dial(customer_id, caller=None if shown else agent, timeout_s=timeout)
        self.emit("customer_ringing", target=self.target)
        deadline = time.monotonic() + timeout + 3
        while not self.channel_up(customer_id):
            if self.channel_gone(agent):
                self.record.end_reason = "agent_hungup_while_ringing"
                return False
            if self.channel_gone(customer_id):
                reason = await self._why_unreachable(customer_id)
                self.record.end_reason = reason.replace("agent_", "customer_")
                await self._quietly(ari.hangup(agent, "busy" if reason == "agent_busy" else "noanswer"))
                return False
            if time.monotonic() > deadline:
                self.record.end_reason = "customer_no_answer"
                await self._quietly(ari.hangup(customer_id, "noanswer"))
                await self._quietly(ari.hangup(agent, "noanswer"))
                return False
            await self.next_event(timeout=0.5)
        self.emit("customer_answered", target=self.target)
        return True
