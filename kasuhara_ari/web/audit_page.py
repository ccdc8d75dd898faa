"""The audit page (admins only): the audit records, filtered and paginated, and the hash chains' state.

Records are read from the evidence index (the audit records are indexed with the recordings; a page view
first picks up the records of today and yesterday, one LIST each, so an action done a moment ago shows).
The chain verification is what ``kasuhara audit verify`` does — one GET per record of the whole log — so
it runs only when an admin asks (a POST with the page's CSRF token), one run at a time, in the background;
the page shows the last run's result until the next.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..audit import ACTIONS, AuditVerifier, VerifyReport
from ..evidence.index import AuditQuery, IndexUnavailable
from ..safe import clean_log_value, is_safe_call_id
from ..search import parse_when, zone
from .console import Console, FormRejected
from .search import MAX_QUERY_CHARS, PAGE_SIZE, index_of
from .sessions import Session

log = logging.getLogger(__name__)

#: Findings shown on the page (``kasuhara audit verify`` prints them all).
MAX_FINDINGS_SHOWN = 100


@dataclass
class VerifyRun:
    """The last (or running) chain verification."""

    by: str
    started: datetime
    report: VerifyReport | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.report is None and self.error is None


class AuditPages:
    def __init__(self, console: Console) -> None:
        self.c = console
        self.index = index_of(console)
        self.verify_run: VerifyRun | None = None
        self._task: asyncio.Task[None] | None = None

    async def _admin(self, request: Request) -> Session | Response:
        session = await self.c.session(request)
        if session is None:
            return self.c.to_login(request)
        if session.role.value != "admin":
            return self.c.forbidden(request, session, "audit")
        return session

    async def page(self, request: Request) -> Response:
        allowed = await self._admin(request)
        if not isinstance(allowed, Session):
            return allowed
        session = allowed
        if self.index is None:
            raise HTTPException(503)
        tz_name = self.c.cfg.general.timezone
        tz = zone(tz_name)
        p = request.query_params
        form = {
            name: p.get(name, "").strip()[: MAX_QUERY_CHARS * 2]
            for name in ("from", "to", "action", "actor", "call_id")
        }
        errors: list[str] = []
        bounds: dict[str, datetime] = {}
        for name in ("from", "to"):
            if form[name]:
                try:
                    if len(form[name]) != 10:
                        raise ValueError(form[name])
                    bounds[name] = parse_when(form[name], tz, end=(name == "to"))
                    bounds[name].astimezone(UTC)
                except (ValueError, OverflowError):
                    errors.append("search_bad_date")
        if "from" in bounds and "to" in bounds and bounds["to"] < bounds["from"]:
            errors.append("search_to_before_from")
        if form["action"] and form["action"] not in ACTIONS:
            errors.append("bad_request")
        if form["actor"] and len(form["actor"]) > MAX_QUERY_CHARS:
            errors.append("search_bad_agent")
        if form["call_id"] and not is_safe_call_id(form["call_id"]):
            errors.append("audit_bad_call_id")
        after = None
        if p.get("after"):
            at_us, sep, key = p["after"][:300].partition("~")
            if not sep or not at_us.isdigit() or len(at_us) > 20 or not key.startswith("audit/"):
                errors.append("search_bad_page")
            else:
                after = (int(at_us), key)
        context: dict[str, Any] = {
            "account": session.account,
            "role": session.role.value,
            "csrf": session.csrf,
            "here": "/audit",
            "form": form,
            "actions": ACTIONS,
            "errors": list(dict.fromkeys(errors)),
            "rows": [],
            "total": None,
            "next_url": None,
            "first_url": None,
            "verify": self._verify_context(tz_name),
            "index": self.index.state,
            "timezone": tz_name,
        }
        if errors:
            return self.c.render(request, "audit.html", 400, **context)
        try:
            await self.index.refresh_audit()
        except IndexUnavailable:
            return self.c.render(
                request, "message.html", 503, message_key="index_unavailable", csrf=session.csrf
            )
        except Exception as exc:  # S3 away: show what the index holds, say so
            self.index.state.last_error = type(exc).__name__
            log.warning("web event=audit_refresh_failed error=%s", clean_log_value(str(exc)[:200]))
        query = AuditQuery(
            start=bounds.get("from"),
            end=bounds.get("to"),
            action=form["action"] or None,
            actor=form["actor"] or None,
            call_id=form["call_id"] or None,
        )
        page = await self.index.audit(query, limit=PAGE_SIZE, after=after)
        params = {k: v for k, v in form.items() if v}
        context["total"] = page.total
        context["rows"] = [
            {
                "at": r.at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S"),
                "action": r.action,
                "result": r.result,
                "by": r.by,
                "host": r.host,
                "reason": r.reason,
                "target": r.call_id
                or " ".join(f"{k}={v}" for k, v in r.target.items() if k not in ("via",))[:200],
            }
            for r in page.rows
        ]
        if page.next is not None:
            context["next_url"] = "/audit?" + urlencode({**params, "after": f"{page.next[0]}~{page.next[1]}"})
        if after is not None:
            context["first_url"] = "/audit?" + urlencode(params)
        return self.c.render(request, "audit.html", **context)

    def _verify_context(self, tz_name: str) -> dict[str, Any] | None:
        run = self.verify_run
        if run is None:
            return None
        out: dict[str, Any] = {
            "running": run.running,
            "by": run.by,
            "started": run.started.astimezone(zone(tz_name)).strftime("%Y-%m-%d %H:%M:%S"),
            "error": run.error,
        }
        if run.report is not None:
            r = run.report
            out.update(
                ok=r.ok,
                records=r.records,
                chains=len(r.chains),
                legacy=len(r.legacy),
                problems=len(r.findings),
                findings=[f.as_dict() for f in r.findings[:MAX_FINDINGS_SHOWN]],
            )
        return out

    async def verify(self, request: Request) -> Response:
        """Start a verification of the whole log (CSRF-checked POST); one at a time."""
        allowed = await self._admin(request)
        if not isinstance(allowed, Session):
            return allowed
        session = allowed
        try:
            await self.c.checked_form(request, session)
        except FormRejected as exc:
            return self.c.rejected(request, exc)
        if self.c.store is None:
            raise HTTPException(503)
        if self.verify_run is None or not self.verify_run.running:
            run = VerifyRun(by=session.account, started=datetime.now(UTC))
            self.verify_run = run
            store = self.c.store

            async def work() -> None:
                try:
                    run.report = await AuditVerifier(store).run()
                    log.info(
                        "web event=audit_verified by=%s records=%d findings=%d",
                        clean_log_value(run.by),
                        run.report.records,
                        len(run.report.findings),
                    )
                except Exception as exc:
                    run.error = type(exc).__name__
                    log.warning("web event=audit_verify_failed error=%s", clean_log_value(str(exc)[:200]))

            self._task = asyncio.create_task(work())
        return RedirectResponse("/audit", status_code=303)


def routes(console: Console) -> list[BaseRoute]:
    pages = AuditPages(console)
    return [
        Route("/audit", pages.page, methods=["GET"]),
        Route("/audit/verify", pages.verify, methods=["POST"]),
    ]
