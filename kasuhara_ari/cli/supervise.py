"""``kasuhara supervise CALL_ID``: listen to, whisper to, or barge into a live call."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click

from ..ari import AriError
from ..events import EventSink, NullEvents
from ..nodes import UnknownNode, node_for_call
from ..safe import is_safe_call_id
from ..supervision import MODES, SessionEvents, SupervisionError, SupervisionSession
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, config_option, load_config


@click.command()
@click.argument("call_id")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="listen",
    show_default=True,
    help="listen: nobody hears you; whisper: only the agent hears you; barge: both hear you.",
)
@click.option(
    "--endpoint",
    default=None,
    help="The supervisor's phone, e.g. PJSIP/supervisor (default: the first of escalation.supervisors).",
)
@click.option(
    "--ring-timeout",
    "ring_timeout_s",
    type=click.IntRange(1, 300),
    default=None,
    help="Seconds to ring the supervisor's phone (default: escalation.ring_timeout_s).",
)
@config_option
def supervise(
    call_id: str, mode: str, endpoint: str | None, ring_timeout_s: int | None, config_path: str | None
) -> None:
    """Ring your phone and join the live call CALL_ID (its id as in `kasuhara monitor`).

    Runs until you hang up, the call ends, or Ctrl-C. The caller's recording is not touched: what you say
    is recorded only in barge mode, where the caller hears it. Exit codes: 0 the session ran and ended,
    1 it could not start (no such call, your phone did not answer, Asterisk unreachable), 2 bad usage
    (or the call id names a node missing from [nodes]: the node is the id's prefix, see README).
    """
    cfg = load_config(config_path)
    if not is_safe_call_id(call_id):
        click.echo(f"kasuhara: {call_id!r} is not a call id", err=True)
        raise SystemExit(EXIT_CONFIG)
    chosen = endpoint or (cfg.escalation.supervisors[0] if cfg.escalation.supervisors else "")
    if not chosen:
        click.echo("kasuhara: no --endpoint and no escalation.supervisors configured", err=True)
        raise SystemExit(EXIT_CONFIG)
    try:
        target = node_for_call(cfg, call_id)  # the node whose id prefix the call carries ([nodes])
    except UnknownNode as exc:
        click.echo(f"kasuhara: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None

    async def main() -> int:
        publisher = SessionEvents(cfg.mqtt) if cfg.mqtt.enabled else None
        sink: EventSink = publisher if publisher is not None else NullEvents()
        session = SupervisionSession(cfg, call_id, mode, chosen, events=sink, ring_timeout_s=ring_timeout_s)
        publishing = asyncio.create_task(publisher.run()) if publisher is not None else None
        task = asyncio.create_task(session.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        click.echo(f"ringing {chosen} to {mode} call {call_id} on node {target.node} ...", err=True)
        try:
            reason = await task
        except asyncio.CancelledError:
            reason = "cancelled"
        except (SupervisionError, AriError) as exc:
            click.echo(f"kasuhara: {exc}", err=True)
            return EXIT_FAILED
        finally:
            if publisher is not None and publishing is not None:
                await publisher.flush(timeout=5)
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publishing
        click.echo(f"supervision ended: {reason}", err=True)
        return EXIT_OK

    try:
        code = asyncio.run(main())
    except OSError as exc:
        click.echo(f"kasuhara: {exc}", err=True)
        code = EXIT_FAILED
    raise SystemExit(code)
