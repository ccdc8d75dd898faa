"""What the phones the app rings show, read from the INVITEs in a packet capture of the loopback interface.

A supervisor rung by ``*9`` or ``kasuhara supervise`` sees why (the ``[callerid]`` templates) and the
customer's number, never "Anonymous"; an outbound customer sees the agent's number or the operator's; a
hostile caller name (a CR LF that could start a new SIP header, or 10 kB) is cleaned, never injected.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.callerid import NAME_MAX_BYTES
from kasuhara_ari.config import Config
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.supervision import SupervisionSession

from audio import Capture, read_pcap
from escalation_helpers import (
    agent_pressing,
    all_finish,
    clean_spool,
    stop_all,
    supervisor_endpoint,
    supervisor_phone,
    wait_ended,
    wait_for_event,
    with_supervisors,
)
from sip import agent_port, answering, caller, free_udp_port

pytestmark = pytest.mark.integration

CUSTOMER_NUMBER = "0312345678"
_FROM = re.compile(r'^(?:From|f)\s*:\s*"((?:[^"\\]|\\.)*)"\s*<sips?:([^@>;]*)@', re.MULTILINE)


@pytest.fixture(autouse=True)
def _clean_spool() -> Iterator[None]:
    yield
    clean_spool()


def invites_to(pcap: Path, port: int) -> list[bytes]:
    """The initial INVITEs Asterisk sent to the phone on ``port``, as they were on the wire."""
    return [udp for _, _, dport, udp in read_pcap(pcap) if dport == port and udp.startswith(b"INVITE ")]


def shown(invite: bytes) -> tuple[str, str]:
    """(display name, user part) of the INVITE's From header."""
    head = invite.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    match = _FROM.search(head)
    assert match, head
    return match.group(1), match.group(2)


def header_names(invite: bytes) -> list[str]:
    head = invite.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return [line.split(":", 1)[0].strip().lower() for line in head.split("\r\n")[1:]]


async def escalate_and_capture(
    service_factory: Any, cfg: Config, sip_workdir: Path, tmp_path: Path, **caller_kwargs: Any
) -> tuple[bytes, str]:
    """One inbound call whose agent presses ``*9``; the INVITE the supervisor's phone got, and the call id."""
    sup_port = free_udp_port(5100, 5999)
    service = await service_factory(with_supervisors(cfg, sup_port))
    port = agent_port()
    supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300).start()
    agent = await agent_pressing(sip_workdir, port, [(1000, "*9")]).start()
    phone = await caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=7000, **caller_kwargs).start()
    pcap = tmp_path / "lo.pcap"
    try:
        async with Capture(pcap, "udp port " + str(sup_port)):
            call_id = await wait_for_event(service, port, "supervisor_joined")
            await all_finish(phone, agent, supervisor)
    finally:
        await stop_all(phone, agent, supervisor)  # a failed wait must not leave phones running
    await wait_ended(service, call_id)
    (invite,) = invites_to(pcap, sup_port)
    return invite, call_id


async def test_star9_supervisor_sees_escalation_agent_and_customer_number(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    invite, _ = await escalate_and_capture(
        service_factory, call_cfg, sip_workdir, tmp_path, number=CUSTOMER_NUMBER
    )
    # The default template: the key, 応援要請 ("asking for help") and the agent; the customer's number.
    assert shown(invite) == ("*9 応援要請 agent", CUSTOMER_NUMBER)


@pytest.mark.parametrize(
    ("kwargs", "expected_name"),
    [
        # A CR LF in the caller's name (through the test dialplan: SIP itself cannot carry one) must not
        # start a new header "X: y" in the supervisor's INVITE.
        ({"name_header": "a%0D%0AX%3A%20y"}, "助けて a X: y"),
        # 10 kB of name (3,400 three-byte characters; SIPp cannot load a longer From): cut at a character
        # to what a phone shows, with a visible mark ("助けて " is 10 bytes, "…" 3).
        ({"display_name": "長" * 3400}, "助けて " + "長" * ((NAME_MAX_BYTES - 13) // 3) + "…"),
        # Quotes and backslashes never reach the header (Asterisk would escape them; we do not rely on it).
        ({"display_name": 'q\\"uote'}, "助けて quote"),
    ],
    ids=["crlf", "10kB", "quote"],
)
async def test_hostile_caller_name_is_cleaned_not_injected(
    service_factory: Any,
    call_cfg: Config,
    sip_workdir: Path,
    tmp_path: Path,
    kwargs: dict[str, str],
    expected_name: str,
) -> None:
    cfg = replace(call_cfg, callerid=replace(call_cfg.callerid, escalation_name="助けて {caller_name}"))
    invite, _ = await escalate_and_capture(
        service_factory, cfg, sip_workdir, tmp_path, number=CUSTOMER_NUMBER, **kwargs
    )
    name, number = shown(invite)
    assert (name, number) == (expected_name, CUSTOMER_NUMBER)
    assert "x" not in header_names(invite), header_names(invite)
    assert len(invite) < 4000, len(invite)


async def test_supervise_leg_shows_mode_agent_and_customer_number(
    running_service: Any, call_cfg: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    service = running_service
    sup_port, port = free_udp_port(5100, 5999), agent_port()
    supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300, hold_ms=1000).start()
    agent = await answering(sip_workdir, port).start()
    phone = await caller(
        sip_workdir, port, app=service.cfg.ari.app, call_ms=4000, number=CUSTOMER_NUMBER
    ).start()
    pcap = tmp_path / "lo.pcap"
    try:
        async with Capture(pcap, "udp port " + str(sup_port)):
            call_id = await wait_for_event(service, port, "agent_answered")
            session = SupervisionSession(
                call_cfg, call_id, "whisper", supervisor_endpoint(sup_port), events=MemoryEvents()
            )
            assert await asyncio.wait_for(session.run(), 30) == "supervisor_hungup"
        assert await phone.wait(60) == 0, phone.error_text()
    finally:
        await stop_all(phone, agent, supervisor)
    await wait_ended(service, call_id)
    (invite,) = invites_to(pcap, sup_port)
    # The stack speaks Japanese (announcement.language = ja).
    assert shown(invite) == ("ウィスパー agent", CUSTOMER_NUMBER)


@pytest.mark.parametrize(
    ("callerid", "expected"),
    [
        ({}, ("agent", "0501234567")),  # default: what the agent's own phone presents
        (
            {"outbound_name": "カスタマーセンター", "outbound_number": "0120123456"},
            ("カスタマーセンター", "0120123456"),
        ),
    ],
    ids=["agent-number", "company-number"],
)
async def test_outbound_customer_sees_the_configured_caller_id(
    service_factory: Any,
    call_cfg: Config,
    sip_workdir: Path,
    tmp_path: Path,
    callerid: dict[str, str],
    expected: tuple[str, str],
) -> None:
    service = await service_factory(replace(call_cfg, callerid=replace(call_cfg.callerid, **callerid)))
    port = agent_port()  # the customer's phone; the agent dials 9<port>
    customer = await answering(sip_workdir, port, ring_ms=300, name="customer").start()
    agent = caller(
        sip_workdir,
        f"9{port}",
        app=service.cfg.ari.app,
        call_ms=1000,
        from_user="agent",
        name="agent",
        number="0501234567",
    )
    pcap = tmp_path / "lo.pcap"
    try:
        async with Capture(pcap, "udp port " + str(port)):
            await agent.start()
            await all_finish(agent, customer)
    finally:
        await stop_all(agent, customer)
    (invite,) = invites_to(pcap, port)
    assert shown(invite) == expected
