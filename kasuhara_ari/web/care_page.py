"""The care report in the console (``/care?month=YYYY-MM``): per-agent exposure, who waits for a follow-up,
the chart, the CSV, and the form a manager records a follow-up with.

A face of :mod:`kasuhara_ari.care` like ``kasuhara care report|note``: the same tally
(:func:`~kasuhara_ari.care.report.build_report` over the month's metadata and the notes), the same note
writer, the same audit actions (``care_report``, ``care_note``) and the same roles (the desk's ``care_*``
permits: supervisor and admin; a viewer gets 403 on every URL here). A note's text stays in its own object,
never in the audit record.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from datetime import date, datetime, timedelta
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..ami import AmiError
from ..care.chart import render_svg
from ..care.cooldown import resume_remote
from ..care.notes import NOTE_MAX_CHARS, check_agent, read_notes, write_note
from ..care.report import CareReport, build_report
from ..evidence.desk import EvidenceDesk
from ..safe import clean_log_value, printable
from ..search import Filters, local_midnight
from ..storage import StorageError
from .console import Console
from .i18n import MESSAGES
from .recordings import zone
from .sessions import Session

log = logging.getLogger(__name__)

_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
#: Outcomes a redirect back to the page may announce (``?done=``): fixed words, never user text.
DONE_NOTICES = frozenset({"note"})
#: A person's name in the chart's label column at most (longer ones are cut, marked).
CHART_NAME_CHARS = 20


def month_bounds(text: str) -> tuple[date, date] | None:
    """The first and last day of ``YYYY-MM`` (None: not a month)."""
    m = _MONTH.fullmatch(text)
    if not m or not 1 <= int(m[2]) <= 12 or int(m[1]) < 1970:
        return None
    first = date(int(m[1]), int(m[2]), 1)
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, nxt - timedelta(days=1)


class CarePages:
    """The handlers; ``self.c`` is the console core."""

    def __init__(self, console: Console) -> None:
        self.c = console
        self.tz = zone(console.cfg.general.timezone)

    def month(self, request: Request) -> str | None:
        """The month asked for (default: this month in ``general.timezone``); None when malformed."""
        text = request.query_params.get("month", "").strip()
        if not text:
            return datetime.now(self.tz).strftime("%Y-%m")
        return text if month_bounds(text) is not None else None

    async def report(self, desk: EvidenceDesk, month: str, shape: str) -> CareReport:
        """The month's report, as ``kasuhara care report`` builds it, on record as ``care_report``."""
        bounds = month_bounds(month)
        assert bounds is not None
        first, last = bounds
        start = local_midnight(first, self.tz)
        end = local_midnight(last + timedelta(days=1), self.tz) - timedelta(milliseconds=1)
        docs = [e.doc async for e in desk.catalog.search(Filters(start=start, end=end))]
        notes = [n async for n in read_notes(desk.store)]
        cfg = self.c.cfg
        rep = build_report(month, docs, notes, care=cfg.care, people=cfg.agents.people, month_start=start)
        await desk.audit.write(
            desk.audit.new(
                "care_report",
                target={"month": month, "agents": len(rep.agents), "recordings": len(docs)},
                details={"format": shape},
            )
        )
        return rep

    def refused(self, request: Request, session: Session, key: str) -> Response:
        """400 with a fixed message (never the form's text)."""
        return self.c.render(request, "message.html", 400, message_key=key, csrf=session.csrf)

    def bad_month(self, request: Request, session: Session) -> Response:
        return self.refused(request, session, "care_bad_month")

    def storage_failed(self, request: Request, session: Session, exc: Exception) -> Response:
        log.warning(
            "web event=care_failed account=%s error=%s", clean_log_value(session.account), type(exc).__name__
        )
        return self.c.render(request, "message.html", 502, message_key="care_failed", csrf=session.csrf)

    async def month_report(self, request: Request, fmt: str) -> tuple[Session, str, CareReport] | Response:
        """The role check, the month asked for and its report (audited as ``care_report`` in ``fmt``), or
        the answer that refuses them."""
        allowed = await self.c.require(request, "care_report")
        if not isinstance(allowed, Session):
            return allowed
        month = self.month(request)
        if month is None:
            return self.bad_month(request, allowed)
        try:
            return allowed, month, await self.report(self.c.desk(allowed), month, fmt)
        except StorageError as exc:
            return self.storage_failed(request, allowed, exc)

    async def page(self, request: Request) -> Response:
        got = await self.month_report(request, "html")
        if isinstance(got, Response):
            return got
        allowed, month, rep = got
        done = request.query_params.get("done", "")
        people = self.c.cfg.agents.people
        agents = sorted({*people, *(r.agent for r in rep.agents)})
        return self.c.render(
            request,
            "care.html",
            csrf=allowed.csrf,
            account=allowed.account,
            role=allowed.role.value,
            here=f"/care?month={quote(month)}",  # the language switch keeps the month on screen
            month=month,
            month_q=quote(month),
            rows=rep.agents,
            waiting=[r for r in rep.agents if r.status == "waiting"],
            agents=agents,
            may_note=allowed.role.value in ("supervisor", "admin"),
            note_max=NOTE_MAX_CHARS,
            notice=f"care_done_{done}" if done in DONE_NOTICES else "",
        )

    async def chart(self, request: Request) -> Response:
        """The SVG chart as an image of the console (the console's CSP applies to it as to every answer:
        nothing in it can run)."""
        got = await self.month_report(request, "svg")
        if isinstance(got, Response):
            return got
        _allowed, _month, rep = got
        # Names from the config are made printable first (a bidi override would reverse the chart's text)
        # and short enough for the chart's label column.
        shown = CareReport(
            rep.month,
            [
                dataclasses.replace(
                    r, person=printable(r.person, max_chars=CHART_NAME_CHARS) if r.person else ""
                )
                for r in rep.agents
            ],
        )
        return Response(
            render_svg(shown, language=self.c.language(request)).encode("utf-8"),
            media_type="image/svg+xml; charset=utf-8",
            headers={"cache-control": "private, no-store"},
        )

    async def csv(self, request: Request) -> Response:
        got = await self.month_report(request, "csv")
        if isinstance(got, Response):
            return got
        _allowed, month, rep = got
        return Response(
            rep.as_csv().encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={
                "content-disposition": f'attachment; filename="care-report-{month}.csv"',
                "cache-control": "private, no-store",
            },
        )

    async def note(self, request: Request) -> Response:
        """A manager's follow-up, as ``kasuhara care note`` writes it (audited ``care_note``)."""
        posted = await self.c.posted(request, "care_note")
        if isinstance(posted, Response):
            return posted
        allowed, form = posted
        month = form.get("month", "")
        back = month if month_bounds(month) is not None else datetime.now(self.tz).strftime("%Y-%m")
        agent = form.get("agent", "").strip()
        text = form.get("text", "")
        people = self.c.cfg.agents.people
        try:
            check_agent(agent)
        except ValueError:
            return self.c.render(
                request, "message.html", 400, message_key="care_bad_agent", csrf=allowed.csrf
            )
        if people and agent not in people:
            return self.c.render(
                request, "message.html", 400, message_key="care_bad_agent", csrf=allowed.csrf
            )
        if not text.strip() or len(text) > NOTE_MAX_CHARS:
            return self.c.render(request, "message.html", 400, message_key="care_bad_text", csrf=allowed.csrf)
        desk = self.c.desk(allowed)
        try:
            written = await write_note(desk.store, agent, text, by=desk.audit.by)
            await desk.audit.write(
                desk.audit.new("care_note", target={"agent": agent, "note_key": written.key})
            )
        except ValueError:
            return self.c.render(request, "message.html", 400, message_key="care_bad_text", csrf=allowed.csrf)
        except StorageError as exc:
            return self.storage_failed(request, allowed, exc)
        log.info("web event=care_note account=%s agent=%s", clean_log_value(allowed.account), agent)
        return RedirectResponse(f"/care?month={quote(back)}&done=note", status_code=303)

    async def resume(self, request: Request) -> Response:
        """End an agent's recovery pause from the board: ``resume_remote``, as ``kasuhara care resume``
        (AMI and MQTT of its own; the service sees the AstDB entry gone), audited ``care_resume``."""
        posted = await self.c.posted(request, "care_resume")
        if isinstance(posted, Response):
            return posted
        allowed, form = posted
        agent = form.get("agent", "").strip()
        people = self.c.cfg.agents.people
        try:
            check_agent(agent)
            known = not people or agent in people
        except ValueError:
            known = False
        if not known:
            return self.answer(request, 400, "pause_bad")
        desk = self.c.desk(allowed)
        try:
            ended = await resume_remote(self.c.cfg, agent, by=desk.audit.by)
        except (AmiError, OSError, TimeoutError) as exc:
            log.warning("web event=care_resume_failed agent=%s error=%s", agent, type(exc).__name__)
            return self.answer(request, 502, "pause_failed")
        result = "resumed" if ended else "not_paused"
        try:
            await desk.audit.write(desk.audit.new("care_resume", target={"agent": agent, "result": result}))
        except StorageError as exc:
            # The pause is already over (it cannot be undone): the missing record is logged loudly.
            log.error("web event=care_resume_not_audited agent=%s error=%s", agent, clean_log_value(exc))
        log.info(
            "web event=care_resume account=%s agent=%s result=%s",
            clean_log_value(allowed.account),
            agent,
            result,
        )
        return self.answer(request, 200, "pause_resumed" if ended else "pause_not_paused", agent=agent)

    def answer(self, request: Request, status: int, key: str, **fields: str) -> JSONResponse:
        text = MESSAGES[self.c.language(request)][key].format(**fields)
        return JSONResponse({"ok": status < 300, "message": text}, status_code=status)


def routes(console: Console) -> list[BaseRoute]:
    pages = CarePages(console)
    return [
        Route("/care/resume", pages.resume, methods=["POST"]),
        Route("/care", pages.page, methods=["GET"]),
        Route("/care/chart.svg", pages.chart, methods=["GET"]),
        Route("/care/report.csv", pages.csv, methods=["GET"]),
        Route("/care/note", pages.note, methods=["POST"]),
    ]
