"""Search in the console: ``/recordings`` over the evidence index (kasuhara_ari/evidence/index.py).

The page reads the local index, never the bucket: a page view is two SQLite queries whatever the number of
recordings. The index is kept current by one background task of the console (a full reconcile at start
and every ``web.index_reconcile_s``, the recent days every ``web.index_refresh_s``).

Listing is audited like ``kasuhara recordings list``: one ``list`` record per search, that is per user
session and set of filters, written when its first page is shown (the next pages of the same search are
not audited again: one record per page view would put dozens of records on the hash chain for one question,
and the audit question is "who looked for what", which the filters and the count answer). A cursor sent
with new filters is still a new search. The record is written in the background, best effort like the
CLI's: the page does not wait for the chain append.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..evidence.index import Cursor, EvidenceIndex, IndexUnavailable, Query, Row
from ..safe import clean_log_value
from ..search import parse_direction, parse_when, zone
from .console import Console
from .sessions import Session

log = logging.getLogger(__name__)

PAGE_SIZE = 50
MAX_QUERY_CHARS = 64
#: Searches remembered as audited (per session and filters); the oldest are forgotten first.
MAX_AUDITED = 10_000

_INDEXES: weakref.WeakKeyDictionary[Console, EvidenceIndex] = weakref.WeakKeyDictionary()


def default_index_path(endpoint: str, bucket: str) -> Path:
    """``$XDG_CACHE_HOME/kasuhara/index-<hash>.sqlite``: one file per endpoint and bucket."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(f"{endpoint}/{bucket}".encode()).hexdigest()[:16]
    return base / "kasuhara" / f"index-{digest}.sqlite"


def index_of(console: Console) -> EvidenceIndex | None:
    """The console's evidence index (one per console, shared by the search and audit pages; its
    background task is registered once). ``None`` when the console has no store."""
    if console.store is None:
        return None
    index = _INDEXES.get(console)
    if index is None:
        cfg = console.cfg
        path = cfg.web.index_path or str(default_index_path(cfg.storage.endpoint, console.store.bucket))
        index = EvidenceIndex(path, console.store, source=f"{cfg.storage.endpoint}/{console.store.bucket}")
        _INDEXES[console] = index
        console.background.append(
            lambda: keep_current(index, cfg.web.index_refresh_s, cfg.web.index_reconcile_s)
        )
    return index


async def keep_current(index: EvidenceIndex, refresh_s: float, reconcile_s: float) -> None:
    """The index's background task: reconcile at start (catching up after downtime), refresh the recent
    days every ``refresh_s``, reconcile every ``reconcile_s``. S3 errors are logged and retried on the next
    round; the pages keep answering from what the index holds."""
    try:
        await index.open()
    except (OSError, sqlite3.Error) as exc:
        # The pages answer 503 and say why; the rest of the console works on.
        index.state.last_error = type(exc).__name__
        log.error(
            "index event=open_failed path=%s error=%s", clean_log_value(index.path), clean_log_value(str(exc))
        )
        return
    loop = asyncio.get_running_loop()
    next_full = loop.time()
    try:
        while True:
            try:
                if loop.time() >= next_full:
                    await index.rebuild()
                    next_full = loop.time() + reconcile_s
                else:
                    await index.refresh()
            except Exception as exc:  # S3 away, a bucket policy: keep serving, try again next round
                index.state.last_error = type(exc).__name__
                log.warning("index event=sync_failed error=%s", clean_log_value(str(exc)[:200]))
            await asyncio.sleep(refresh_s)
    finally:
        index.close()


def local_time(iso: str | None, tz_name: str) -> str:
    """An ISO timestamp of ours in the configured zone, as the pages show times ("" for None)."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone(zone(tz_name)).strftime("%Y-%m-%d %H:%M:%S")


def mask_number(number: str | None) -> str:
    """A caller number as a viewer sees it: every digit but the last four replaced (server-side)."""
    if not number:
        return ""
    digits = [i for i, ch in enumerate(number) if ch.isdigit()]
    keep = set(digits[-4:])
    return "".join(ch if (i in keep or not ch.isdigit()) else "•" for i, ch in enumerate(number))[-32:]


@dataclass(frozen=True)
class Form:
    """What the user typed, kept to fill the form again (escaped by the template)."""

    start: str = ""
    end: str = ""
    caller: str = ""
    agent: str = ""
    direction: str = ""
    flagged: bool = False
    held: bool = False
    min_duration: str = ""

    def params(self) -> dict[str, str]:
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, str) and v}
        for name in ("flagged", "held"):
            if getattr(self, name):
                out[name] = "1"
        return {("from" if k == "start" else "to" if k == "end" else k): v for k, v in out.items()}


def read_form(params: Mapping[str, str]) -> Form:
    def text(name: str) -> str:
        return params.get(name, "").strip()[: MAX_QUERY_CHARS * 2]

    return Form(
        start=text("from"),
        end=text("to"),
        caller=text("caller"),
        agent=text("agent"),
        direction=text("direction"),
        flagged=params.get("flagged") == "1",
        held=params.get("held") == "1",
        min_duration=text("min_duration"),
    )


def build_query(form: Form, tz_name: str, *, viewer: bool) -> tuple[Query | None, list[str]]:
    """The index query of a form, or the message keys of what is wrong with it."""
    errors: list[str] = []
    tz = zone(tz_name)
    start = end = None
    for name, value in (("from", form.start), ("to", form.end)):
        if not value:
            continue
        if len(value) != 10:
            errors.append("search_bad_date")
            continue
        try:
            moment = parse_when(value, tz, end=(name == "to"))
            # Far dates are valid ISO but no instant the index can compare (overflow): refused here.
            moment.astimezone(UTC)
        except (ValueError, OverflowError):
            errors.append("search_bad_date")
            continue
        if name == "from":
            start = moment
        else:
            end = moment
    if start is not None and end is not None and end < start:
        errors.append("search_to_before_from")
    direction = None
    if form.direction:
        try:
            direction = parse_direction(form.direction)
        except ValueError:
            errors.append("search_bad_direction")
    caller = form.caller or None
    if caller is not None:
        if len(caller) > MAX_QUERY_CHARS:
            errors.append("search_bad_caller")
        elif viewer and not (caller.isdigit() and len(caller) <= 4):
            # A viewer sees four digits; a filter on more would tell the rest of the number.
            errors.append("search_viewer_caller")
    agent = form.agent or None
    if agent is not None and len(agent) > MAX_QUERY_CHARS:
        errors.append("search_bad_agent")
    min_duration = None
    if form.min_duration:
        try:
            min_duration = float(form.min_duration)
            if not 0 <= min_duration <= 7 * 86400:
                raise ValueError(form.min_duration)
        except ValueError:
            errors.append("search_bad_duration")
    if errors:
        return None, list(dict.fromkeys(errors))
    return (
        Query(
            start=start,
            end=end,
            caller=caller,
            caller_suffix=viewer,
            agent=agent,
            direction=direction,
            flagged=form.flagged,
            held=form.held,
            min_duration_s=min_duration,
        ),
        [],
    )


def shown_row(row: Row, tz_name: str, *, viewer: bool) -> dict[str, Any]:
    """A result row as the template gets it: times in the configured zone, the caller masked for viewers
    (and a viewer gets no caller name: the name identifies the caller as much as the number)."""
    tz = zone(tz_name)
    duration = ""
    if row.duration_s is not None:
        whole = int(row.duration_s)
        duration = f"{whole // 60}:{whole % 60:02d}"
    return {
        "call_id": row.call_id,
        "started": row.started_at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S"),
        "direction": row.direction or "",
        "caller": mask_number(row.caller_number) if viewer else (row.caller_number or ""),
        "caller_name": "" if viewer else (row.caller_name or ""),
        "agent": row.agent or "",
        "duration": duration,
        "flags": row.flags,
        "held": row.held,
    }


class SearchPages:
    def __init__(self, console: Console) -> None:
        self.c = console
        self.index = index_of(console)
        self._audited: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    async def recordings(self, request: Request) -> Response:
        allowed = await self.c.require(request, "list")
        if not isinstance(allowed, Session):
            return allowed
        session = allowed
        if self.index is None:
            raise HTTPException(503)
        viewer = session.role.value == "viewer"
        tz_name = self.c.cfg.general.timezone
        form = read_form(request.query_params)
        query, errors = build_query(form, tz_name, viewer=viewer)
        after = None
        if request.query_params.get("after"):
            try:
                after = Cursor.parse(request.query_params["after"][:400])
            except ValueError:
                errors.append("search_bad_page")
        context: dict[str, Any] = {
            "account": session.account,
            "role": session.role.value,
            "csrf": session.csrf,
            "here": "/recordings",
            "form": form,
            "errors": errors,
            "rows": [],
            "total": None,
            "next_url": None,
            "first_url": None,
            "index": self.index.state,
            "index_updated": local_time(self.index.state.refreshed_at, tz_name),
            "timezone": tz_name,
        }
        if errors or query is None:
            return self.c.render(request, "search.html", 400, **context)
        try:
            page = await self.index.search(query, limit=PAGE_SIZE, after=after)
        except IndexUnavailable:
            return self.c.render(
                request, "message.html", 503, message_key="index_unavailable", csrf=session.csrf
            )
        params = form.params()
        context["rows"] = [shown_row(r, tz_name, viewer=viewer) for r in page.rows]
        context["total"] = page.total
        if page.next is not None:
            context["next_url"] = "/recordings?" + urlencode({**params, "after": page.next.token()})
        if after is not None:
            context["first_url"] = "/recordings?" + urlencode(params)
        self._audit(session, query, page.total)
        return self.c.render(request, "search.html", **context)

    def _audit(self, session: Session, query: Query, total: int) -> None:
        """One ``list`` record per session and filters (see the module docstring), in the background."""
        target = {**query.as_dict(), "via": "web"}
        mark = hashlib.sha256(f"{session.id}\0{json.dumps(target, sort_keys=True)}".encode()).hexdigest()
        if mark in self._audited:
            return
        self._audited[mark] = None
        while len(self._audited) > MAX_AUDITED:
            self._audited.popitem(last=False)
        try:
            desk = self.c.desk(session)
        except HTTPException:  # a console without an audit sink (tests of other pages): nothing to write to
            log.warning("web event=list_not_audited reason=no_event_sink")
            return

        async def write() -> None:
            try:
                await desk.note(desk.audit.new("list", target=target, details={"counts": {"matched": total}}))
            except Exception as exc:  # best effort, like the CLI's list record; never an unseen task error
                log.warning("web event=list_audit_failed error=%s", type(exc).__name__)

        task = asyncio.create_task(write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def routes(console: Console) -> list[BaseRoute]:
    pages = SearchPages(console)
    return [Route("/recordings", pages.recordings, methods=["GET"])]
