"""The live board: every call in progress, pushed to the browser as it changes.

``BoardFeed`` follows the broker (``<prefix>/status``, ``<prefix>/live/+`` and ``<prefix>/calls/+/+``)
with the same model as ``kasuhara monitor`` (:mod:`kasuhara_ari.live`) and fans the changes out to every
open board over server-sent events (``/board/stream``): a full snapshot on connect, then deltas.

Not losing calls in progress: the service keeps each live call's snapshot retained, so a console started
mid-call gets them on subscribing; after a (re)connection of the console, or when the service reconnects
(its ``status`` online/connected), every call is unconfirmed until a snapshot or event of it arrives, and
the unconfirmed ones are dropped ``RESYNC_GRACE_S`` after the status (the service republishes its
snapshots right after its status, so only calls that ended meanwhile go).

What a viewer's browser receives is decided here: the caller's number masked to its last 4 characters
(the full number never leaves the server), and every text made printable (bidi overrides and controls
become visible escapes) — the page still writes it with ``textContent`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from .. import mqtt_client
from ..accounts import Role
from ..audit import AuditLog
from ..config import MqttConfig
from ..events import NullEvents, mqtt_tls_context
from ..live import MAX_CALLS, MAX_NODES, MAX_PAYLOAD_BYTES, PAUSE_EVENTS, LiveBoard, LiveCall, parse_at
from ..node import is_safe_node_name
from ..nodes import UnknownNode, node_for_call
from ..safe import clean_log_value, is_safe_call_id, load_untrusted_json, printable
from ..storage import StorageError
from ..supervision import MODES, SupervisionError, SupervisionSession
from .console import Console, FormRejected
from .i18n import MESSAGES
from .sessions import ROLE_RECHECK_S, Session

log = logging.getLogger(__name__)

#: A comment line to every open stream this often: proxies keep the connection, the browser sees it live.
HEARTBEAT_S = 15.0
#: An open stream re-checks its session (expired, disabled, role changed) this often.
RECHECK_S = 5.0
#: Messages waiting for one browser; a browser that falls this far behind is dropped (it reconnects and
#: gets a fresh snapshot), never buffered in the console's memory.
CLIENT_QUEUE = 512
#: Open boards at most (each is a queue and a task).
MAX_CLIENTS = 500
#: After the service's (or our own) reconnection, calls not confirmed within this are dropped.
RESYNC_GRACE_S = 3.0
#: Supervision sessions the console runs at once (each rings a phone and holds an ARI connection).
MAX_SUPERVISIONS = 20
#: Text fields as sent to a browser.
SHOWN_CHARS = 120


def mask_number(number: str) -> str:
    """A caller's number for a viewer: only the last 4 characters, the rest as bullets."""
    if not number:
        return ""
    keep = number[-4:] if len(number) > 4 else ""
    return "•" * min(len(number) - len(keep), 12) + keep


def call_row(call: LiveCall, *, masked: bool) -> dict[str, Any]:
    """One call as a browser receives it (every string printable; the number masked for a viewer)."""
    number = mask_number(call.caller_number) if masked else call.caller_number

    def shown(value: str) -> str:
        return printable(value, max_chars=SHOWN_CHARS) if value else ""

    return {
        "call_id": call.call_id,
        "state": call.state,
        "direction": call.direction if call.direction in ("inbound", "outbound") else "",
        "caller_number": shown(number),
        "caller_name": shown(call.caller_name),
        "agent": shown(call.agent),
        "supervisor": shown(call.supervisor),
        "supervision": call.supervision if call.supervision in MODES else "",
        "escalation": call.escalation if call.escalation.isalpha() else "",
        "badges": list(call.badges),
        "alert": call.alert,
        "started_at": call.started_at.isoformat(timespec="milliseconds") if call.started_at else None,
        "at": call.updated_at.isoformat(timespec="milliseconds") if call.updated_at else None,
    }


#: The words board.js needs (the rest of the page is rendered on the server).
_JS_TEXTS = ("board_", "col_", "state_", "dir_", "badge_", "join_", "pause_")


def board_texts(lang: str) -> dict[str, str]:
    return {k: v for k, v in MESSAGES[lang].items() if k.startswith(_JS_TEXTS)}


def sse(kind: str, data: object) -> str:
    """One server-sent event (JSON is one line: ensure_ascii leaves no raw newline or control in it)."""
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=True, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events. An open board never ends by itself: at shutdown ``kasuhara web`` cuts it after
    a grace period (uvicorn cancels the request), which is the normal end of a board, not a crash."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.info("web event=board_stream_closed reason=shutdown")
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


@dataclass(eq=False)
class BoardClient:
    """One open board: its queue, and whether it may see full numbers."""

    masked: bool
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    dropped: bool = False


class BoardFeed:
    """The console's view of the calls and the service, and the open boards it keeps up to date."""

    def __init__(
        self,
        mqtt: MqttConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        people: Mapping[str, str] | None = None,
    ) -> None:
        self.mqtt = mqtt
        #: ``[agents]``: the person behind an endpoint, shown beside a pausing agent.
        self.people = dict(people or {})
        self.clock = clock
        self.prefix = mqtt.topic_prefix
        self.board = LiveBoard(max_calls=MAX_CALLS)
        self.clients: set[BoardClient] = set()
        #: Our own connection to the broker (False: the page says "connection to the broker lost").
        self.broker_connected = False
        self._epoch = 0
        self._confirmed: dict[str, int] = {}
        self._awaiting_status = False
        self._sweep_at: float | None = None
        #: Per node, the (boot, at) of its service's last "online": a new one is that service restarting.
        self._last_online: dict[str, tuple[Any, Any]] = {}
        #: Per node whose service restarted: (when to sweep, since when its calls must be confirmed).
        self._node_sweeps: dict[str, tuple[float, float]] = {}
        self._confirmed_at: dict[str, float] = {}
        self._ended: dict[str, None] = {}
        self.ignored = 0

    # --- what the browsers get --------------------------------------------------------------------------

    def service(self) -> dict[str, Any]:
        status = self.board.status or {}
        state = status.get("state")
        at = parse_at(status.get("at"))
        return {
            "state": state if state in ("online", "offline") else "unknown",
            "since": at.isoformat(timespec="seconds") if at else None,
            "hostname": printable(status.get("hostname"), max_chars=64) if status.get("hostname") else "",
            "broker": self.broker_connected,
        }

    def pause_rows(self) -> list[dict[str, Any]]:
        """The agents in a recovery pause (care), soonest back first; every string printable."""
        far = dt.datetime.max.replace(tzinfo=dt.UTC)
        return [
            {
                "agent": p.agent,
                "person": printable(self.people.get(p.agent, ""), max_chars=SHOWN_CHARS),
                "trigger": p.trigger if p.trigger.replace("_", "").isalpha() else "",
                "until": p.until.isoformat(timespec="milliseconds") if p.until else None,
            }
            for p in sorted(self.board.pauses.values(), key=lambda p: (p.until or far, p.agent))
        ]

    def snapshot(self, client: BoardClient) -> str:
        calls = [call_row(c, masked=client.masked) for c in self.board.calls.values() if c.live]
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        return sse(
            "snapshot", {"calls": calls, "service": self.service(), "now": now, "pauses": self.pause_rows()}
        )

    def subscribe(self, *, masked: bool) -> BoardClient | None:
        if len(self.clients) >= MAX_CLIENTS:
            return None
        client = BoardClient(masked=masked)
        self.clients.add(client)
        return client

    def unsubscribe(self, client: BoardClient) -> None:
        self.clients.discard(client)

    def _send(self, make: Callable[[bool], str]) -> None:
        texts: dict[bool, str] = {}
        for client in list(self.clients):
            if client.dropped:
                continue
            text = texts.get(client.masked)
            if text is None:
                text = texts[client.masked] = make(client.masked)
            try:
                client.queue.put_nowait(text)
            except asyncio.QueueFull:
                # A browser that does not read: dropped (it reconnects and starts from a snapshot).
                client.dropped = True
                self.clients.discard(client)
                with contextlib.suppress(asyncio.QueueEmpty):
                    client.queue.get_nowait()
                client.queue.put_nowait(None)
                log.warning("web event=board_client_dropped reason=slow queued=%d", CLIENT_QUEUE)

    def _changed(self, call: LiveCall) -> None:
        # `sent`: when the console passed the change on (the browser's DOM time minus `at` is the whole
        # path; `sent` − `at` the part before the browser: scripts/bench_console.py reports both).
        sent = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        self._send(lambda masked: sse("call", {**call_row(call, masked=masked), "sent": sent}))

    def _gone(self, call_id: str) -> None:
        self._send(lambda masked: sse("gone", {"call_id": call_id}))

    def _service_changed(self) -> None:
        self._send(lambda masked: sse("service", self.service()))

    def _pauses_changed(self) -> None:
        self._send(lambda masked: sse("pauses", {"pauses": self.pause_rows()}))

    # --- what the broker says ---------------------------------------------------------------------------

    def connected(self) -> None:
        """Our (re)connection: everything is unconfirmed until the retained state comes in again."""
        self.broker_connected = True
        self._epoch += 1
        self._awaiting_status = True
        self._sweep_at = None
        self._service_changed()

    def disconnected(self) -> None:
        if self.broker_connected:
            self.broker_connected = False
            self._service_changed()

    def handle(self, topic: str, raw: bytes) -> None:
        """One message of the broker; anything that is not what the service publishes is ignored."""
        if not topic.startswith(self.prefix + "/"):
            return
        levels = topic[len(self.prefix) + 1 :].split("/")
        node_status = len(levels) == 2 and levels[0] == "status" and is_safe_node_name(levels[1])
        if levels == ["status"] or node_status:
            self._status(raw)
        elif len(levels) == 2 and levels[0] == "live" and is_safe_call_id(levels[1]):
            self._snapshot(levels[1], raw)
        elif len(levels) == 3 and levels[0] == "calls" and is_safe_call_id(levels[1]):
            self._event(levels[1], raw)

    def _load(self, raw: bytes) -> dict[str, Any] | None:
        try:
            doc = load_untrusted_json(raw, max_bytes=MAX_PAYLOAD_BYTES, max_depth=16)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            self.ignored += 1
            return None
        return doc

    def _status(self, raw: bytes) -> None:
        doc = self._load(raw)
        if doc is None or doc.get("event") != "status":
            return
        self.board.apply(doc)
        if doc.get("state") == "online":
            node = str(doc["node"]) if isinstance(doc.get("node"), str) else ""
            key = (doc.get("boot"), doc.get("at"))
            service_reconnected = doc.get("reason") == "connected" and key != self._last_online.get(node)
            if self._awaiting_status:  # our own reconnect: every node's retained state comes again
                self._sweep_at = self.clock() + RESYNC_GRACE_S
            elif service_reconnected:
                # That node's service restarted (or reconnected): its snapshots come again right after
                # this status; its calls that do not are gone. Other nodes' calls are not its business.
                now = self.clock()
                self._node_sweeps[node] = (now + RESYNC_GRACE_S, now)
            self._awaiting_status = False
            if node in self._last_online or len(self._last_online) < MAX_NODES:
                self._last_online[node] = key
        self._service_changed()

    def _snapshot(self, call_id: str, raw: bytes) -> None:
        if call_id in self._ended:
            return
        if not raw:  # cleared: the call is over
            self._end(call_id)
            return
        doc = self._load(raw)
        call = LiveCall.from_snapshot(doc, call_id) if doc is not None else None
        if doc is None or call is None:
            return
        if self.board.stale(doc):
            return  # left retained by an earlier run of its node's service: not confirmed, swept
        if not call.live:
            return
        self.board.put(call)
        self._confirm(call_id)
        self._changed(call)

    def _event(self, call_id: str, raw: bytes) -> None:
        doc = self._load(raw)
        if doc is None or doc.get("call_id") != call_id:
            return
        if doc.get("event") in PAUSE_EVENTS:
            # About the agent, published once the call is over: never a call on the board.
            if self.board.apply_pause(doc):
                self._pauses_changed()
            return
        if call_id in self._ended:
            return
        call = self.board.apply(doc)
        if call is None:
            return
        if not call.live:
            self._end(call_id)
            return
        self._confirm(call_id)
        self._changed(call)

    def _end(self, call_id: str) -> None:
        """The call is over: off the board, and late or re-sent events never bring it back."""
        self._confirmed.pop(call_id, None)
        self._ended[call_id] = None
        while len(self._ended) > MAX_CALLS:
            del self._ended[next(iter(self._ended))]
        if self.board.remove(call_id) is not None:
            self._gone(call_id)

    def _confirm(self, call_id: str) -> None:
        self._confirmed[call_id] = self._epoch
        self._confirmed_at[call_id] = self.clock()
        while len(self._confirmed) > MAX_CALLS:
            del self._confirmed[next(iter(self._confirmed))]
        while len(self._confirmed_at) > MAX_CALLS:
            del self._confirmed_at[next(iter(self._confirmed_at))]

    def tick(self) -> None:
        """Drop the calls nobody confirmed after a resync, once its grace period is over: every call
        after our own reconnect, a node's calls after that node's service restarted; and pauses whose end
        was missed, once their time is up."""
        if self.board.pauses and self.board.expire_pauses(dt.datetime.now(dt.UTC)):
            self._pauses_changed()
        now = self.clock()
        gone: list[str] = []
        if self._sweep_at is not None and now >= self._sweep_at:
            self._sweep_at = None
            gone += [c for c in self.board.calls if self._confirmed.get(c, -1) < self._epoch]
        for node, (due, since) in list(self._node_sweeps.items()):
            if now < due:
                continue
            del self._node_sweeps[node]
            gone += [
                call_id
                for call_id, call in self.board.calls.items()
                if call.node == node and self._confirmed_at.get(call_id, -1.0) < since
            ]
        for call_id in dict.fromkeys(gone):
            self.board.remove(call_id)
            self._confirmed.pop(call_id, None)
            self._confirmed_at.pop(call_id, None)
            self._gone(call_id)

    # --- the connection ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the broker until cancelled, reconnecting with backoff."""
        delay = 0.5
        while True:
            try:
                async with mqtt_client.Client(
                    self.mqtt.host,
                    self.mqtt.port,
                    username=self.mqtt.username or None,
                    password=self.mqtt.password or None,
                    tls_context=mqtt_tls_context(self.mqtt),
                    keepalive=15,
                    timeout=10,
                ) as client:
                    self.connected()
                    for topic in ("status", "status/+", "live/+", "calls/+/+"):
                        await client.subscribe(f"{self.prefix}/{topic}", qos=1)
                    log.info("web event=board_feed_connected host=%s port=%d", self.mqtt.host, self.mqtt.port)
                    delay = 0.5
                    messages = client.messages.__aiter__()
                    while True:
                        try:
                            message = await asyncio.wait_for(messages.__anext__(), 1.0)
                        except TimeoutError:
                            self.tick()
                            continue
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        try:
                            self.handle(message.topic.value, payload)
                        except Exception as exc:  # a payload nobody foresaw must not end the feed
                            self.ignored += 1
                            log.warning("web event=board_message_ignored error=%s", type(exc).__name__)
                        self.tick()
            except aiomqtt.MqttError as exc:
                log.warning("web event=board_feed_lost error=%s retry_in_s=%.1f", clean_log_value(exc), delay)
            self.disconnected()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


class BoardPages:
    def __init__(self, console: Console) -> None:
        self.c = console
        cfg = console.cfg
        self.feed = BoardFeed(cfg.mqtt, people=cfg.agents.people) if cfg.mqtt.enabled else None
        #: Supervision sessions started from the board, by account (owned by the app's lifespan).
        self.supervisions: dict[str, asyncio.Task[None]] = {}

    async def board(self, request: Request) -> Response:
        session = await self.c.session(request)
        if session is None:
            return self.c.to_login(request)
        return self.c.render(
            request,
            "board.html",
            account=session.account,
            role=session.role.value,
            csrf=session.csrf,
            here="/",
            may_join=session.role in (Role.SUPERVISOR, Role.ADMIN),
            may_resume=session.role in (Role.SUPERVISOR, Role.ADMIN),
            feed=self.feed is not None,
            board_texts=board_texts(self.c.language(request)),
        )

    # --- the stream -------------------------------------------------------------------------------------

    async def stream_ends(self, session: Session, role: Role) -> str | None:
        """Why the stream of ``session`` must end now, or None. Re-checked without restarting the idle
        clock: ``session`` when it expired or the account was deleted or disabled; ``role`` when the role
        changed (the browser reconnects at once and gets what the new role may see)."""
        current = self.c.sessions.peek(session.id)
        if current is None:
            return "session"
        if self.c.clock() - current.role_checked >= ROLE_RECHECK_S:
            try:
                account = await self.c.accounts.get(current.account)
            except Exception as exc:
                log.warning("web event=accounts_unavailable error=%s", type(exc).__name__)
                return None  # the store is away: the next check asks again
            if account is None or account.disabled:
                self.c.sessions.delete(current.id)
                return "session"
            current.role, current.role_checked = account.role, self.c.clock()
        return None if current.role == role else "role"

    async def stream(self, request: Request) -> Response:
        session = await self.c.session(request)
        if session is None:
            return PlainTextResponse("not logged in", status_code=401)
        if self.feed is None:
            return PlainTextResponse("the board needs [mqtt] enabled", status_code=503)
        role = session.role
        client = self.feed.subscribe(masked=role == Role.VIEWER)
        if client is None:
            return PlainTextResponse("too many open boards", status_code=503, headers={"retry-after": "10"})
        feed = self.feed
        log.info(
            "web event=board_open account=%s clients=%d", clean_log_value(session.account), len(feed.clients)
        )

        async def body() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n" + feed.snapshot(client)
                checked = sent = time.monotonic()
                while True:
                    try:
                        text = await asyncio.wait_for(client.queue.get(), RECHECK_S)
                    except TimeoutError:
                        text = ""
                    now = time.monotonic()
                    if text is None:
                        return  # too slow: dropped
                    if text:
                        yield text
                        sent = now
                    elif now - sent >= HEARTBEAT_S:
                        yield ": heartbeat\n\n"
                        sent = now
                    if now - checked >= RECHECK_S:
                        checked = now
                        reason = await self.stream_ends(session, role)
                        if reason is not None:
                            log.info(
                                "web event=board_closed account=%s reason=%s",
                                clean_log_value(session.account),
                                reason,
                            )
                            yield sse("end", {"reason": reason})
                            return
            finally:
                feed.unsubscribe(client)

        return EventStream(
            body(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    # --- joining a call ---------------------------------------------------------------------------------

    async def join(self, request: Request) -> Response:
        """A supervisor's or admin's phone is rung and joins the call (listen, whisper or barge): the same
        SupervisionSession as ``kasuhara supervise``, run as the console's background task."""
        allowed = await self.c.require(request, "supervise")
        if not isinstance(allowed, Session):
            return allowed
        session = allowed
        try:
            form = await self.c.checked_form(request, session)
        except FormRejected as exc:
            return self.c.rejected(request, exc)
        call_id, mode = form.get("call_id", ""), form.get("mode", "")
        if not is_safe_call_id(call_id) or mode not in MODES:
            return self._answer(request, 400, "join_bad")
        call = self.feed.board.calls.get(call_id) if self.feed is not None else None
        if call is None or not call.live:
            return self._answer(request, 404, "join_no_call")
        running = self.supervisions.get(session.account)
        if (running is not None and not running.done()) or len(self.supervisions) >= MAX_SUPERVISIONS:
            return self._answer(request, 409, "join_busy")
        try:
            account = await self.c.accounts.get(session.account)
        except Exception as exc:
            log.warning("web event=accounts_unavailable error=%s", type(exc).__name__)
            return self._answer(request, 503, "unavailable")
        endpoint = (account.endpoint if account is not None else "") or next(
            iter(self.c.cfg.escalation.supervisors), ""
        )
        if not endpoint:
            return self._answer(request, 409, "join_no_phone")
        try:  # the node that carries the call: its id names it, [nodes] says where its ARI is
            node_for_call(self.c.cfg, call_id)
        except UnknownNode as exc:
            log.error("web event=supervise_unknown_node call_id=%s error=%s", call_id, clean_log_value(exc))
            return self._answer(request, 409, "join_unknown_node")
        by = self.c.principal(session).name
        # Audited before the phone rings: a join that cannot be recorded does not happen.
        if self.c.store is not None and self.c.events is not None:
            audit = AuditLog(self.c.store, self.c.events, by=by)
            record = audit.new(
                "supervise", target={"call_id": call_id}, details={"mode": mode, "endpoint": endpoint}
            )
            try:
                await audit.write(record)
            except StorageError as exc:
                log.error(
                    "web event=supervise_not_audited call_id=%s error=%s", call_id, clean_log_value(exc)
                )
                return self._answer(request, 503, "join_not_audited")
        events = self.c.events or NullEvents()
        supervision = SupervisionSession(self.c.cfg, call_id, mode, endpoint, events=events, by=by)
        task = asyncio.create_task(self._supervise(supervision, session.account), name=f"supervise-{call_id}")
        self.supervisions[session.account] = task
        log.info(
            "web event=supervise account=%s call_id=%s mode=%s endpoint=%s",
            clean_log_value(session.account),
            call_id,
            mode,
            clean_log_value(endpoint),
        )
        return self._answer(request, 202, "join_ringing", endpoint=printable(endpoint, max_chars=80))

    async def _supervise(self, supervision: SupervisionSession, account: str) -> None:
        try:
            reason = await supervision.run()
            log.info("web event=supervise_ended call_id=%s reason=%s", supervision.call_id, reason)
        except SupervisionError as exc:
            log.warning(
                "web event=supervise_failed call_id=%s error=%s", supervision.call_id, clean_log_value(exc)
            )
        except Exception as exc:  # ARI away, or a bug: logged, never raised into the console
            log.error(
                "web event=supervise_failed call_id=%s error=%s", supervision.call_id, type(exc).__name__
            )
        finally:
            if self.supervisions.get(account) is asyncio.current_task():
                del self.supervisions[account]

    def _answer(self, request: Request, status: int, key: str, **fields: str) -> JSONResponse:
        text = MESSAGES[self.c.language(request)][key].format(**fields)
        return JSONResponse({"ok": status < 300, "message": text}, status_code=status)

    async def own_supervisions(self) -> None:
        """The supervision tasks belong to the app: its shutdown hangs their phones up."""
        try:
            await asyncio.Event().wait()
        finally:
            tasks = list(self.supervisions.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def routes(console: Console) -> list[BaseRoute]:
    pages = BoardPages(console)
    if pages.feed is not None:
        console.background.append(pages.feed.run)
    console.background.append(pages.own_supervisions)
    return [
        Route("/", pages.board, methods=["GET"]),
        Route("/board/stream", pages.stream, methods=["GET"]),
        Route("/board/join", pages.join, methods=["POST"]),
    ]
