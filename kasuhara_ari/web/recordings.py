"""Recordings in the console: the recording page, playback with HTTP Range, the waveform, and the actions
(hold, release, download, export, delete), every one through the evidence desk with its role check and
audit record; the role is checked here first as well, so a refusal costs no S3 request.

Playback is audited as ``play`` once per session and call: the first audio request goes through
``desk.play`` (its record is written before a byte is read); the seeks that follow (more Range requests of
the same session for the same call) reuse that grant for PLAY_GRANT_S instead of writing a record each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..evidence.desk import (
    PERMITS,
    DeskError,
    DeskFailed,
    DeskIntegrityFailure,
    DeskNotFound,
    DeskRefused,
    EvidenceDesk,
    Shown,
)
from ..safe import clean_log_value, is_safe_call_id, printable
from ..signing import SigningError, load_signer
from ..storage import StorageError
from .audio_stream import ClosingStream, Granting, RangeReader, file_blocks, ranged_audio
from .audio_stream import blocks as stream_blocks
from .console import Console, FormRejected
from .playback import PlayGrant, PlayGrants
from .sessions import Session
from .waveform import Waveform, WaveformCache, compute_waveform, markers

log = logging.getLogger(__name__)

#: Reasons (hold, release, download, export, delete) longer than this are refused, not cut.
REASON_MAX_CHARS = 500
#: Outcomes a redirect back to the page may announce (``?done=``): fixed words, never user text.
DONE_NOTICES = frozenset({"hold", "already_held", "release", "not_held"})


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(value: object, tz: ZoneInfo) -> str:
    """An ISO timestamp from metadata in the configured timezone; what does not parse is shown escaped."""
    if not isinstance(value, str) or not value:
        return "-"
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError
        return parsed.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")
    except (ValueError, OverflowError):
        return printable(value, max_chars=40)


def masked(number: object) -> str:
    """A caller number as a viewer sees it: the last 4 characters."""
    if not isinstance(number, str) or not number:
        return "-"
    return "*" * min(8, max(0, len(number) - 4)) + number[-4:]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


class RecordingPages:
    """The handlers; ``self.c`` is the console core."""

    def __init__(self, console: Console) -> None:
        self.c = console
        self.grants = PlayGrants(console.clock)
        self.granting = Granting(self.grants)
        self.waveforms = WaveformCache()
        self.tz = zone(console.cfg.general.timezone)

    # ------------------------------------------------------------------------------------- helpers

    @staticmethod
    def call_id(request: Request) -> str:
        cid = request.path_params["call_id"]
        if not isinstance(cid, str) or not is_safe_call_id(cid):
            raise HTTPException(404)
        return cid

    def reader(self) -> RangeReader:
        store = self.c.store
        if store is None or self.c.events is None:
            raise HTTPException(503)
        if not isinstance(store, RangeReader):
            raise HTTPException(501)
        return store

    def message(
        self,
        request: Request,
        session: Session,
        status: int,
        key: str,
        call_id: str | None,
        detail: str = "",
    ) -> Response:
        return self.c.render(
            request,
            "recording_message.html",
            status,
            message_key=key,
            detail=detail,
            call_id=call_id,
            csrf=session.csrf,
            account=session.account,
            role=session.role.value,
            here=request.url.path,
        )

    def failed(self, request: Request, session: Session, call_id: str, exc: Exception) -> Response:
        """A desk or storage error as a page: what the desk said, with the status its kind means."""
        if isinstance(exc, DeskNotFound):
            status, key = 404, "rec_not_found"
        elif isinstance(exc, DeskRefused):
            # The role was checked before the desk ran: what the desk still refuses is the state (a hold).
            status, key = 409, "rec_refused"
        elif isinstance(exc, DeskIntegrityFailure):
            status, key = 500, "rec_integrity_failure"
        elif isinstance(exc, DeskError):
            status, key = 500, "rec_failed"
        else:
            status, key = 502, "rec_storage_failed"
        log.warning(
            "web event=recording_refused account=%s call_id=%s status=%d error=%s message=%s",
            clean_log_value(session.account),
            call_id,
            status,
            type(exc).__name__,
            clean_log_value(str(exc)),
        )
        return self.message(request, session, status, key, call_id, str(exc))

    async def action_form(
        self, request: Request, action: str
    ) -> tuple[Session, str, dict[str, str], str] | Response:
        """The checks every action makes: role, call id, CSRF + origin, a reason."""
        allowed = await self.c.require(request, action)
        if not isinstance(allowed, Session):
            return allowed
        cid = self.call_id(request)
        try:
            form = await self.c.checked_form(request, allowed)
        except FormRejected as exc:
            return self.c.rejected(request, exc)
        reason = form.get("reason", "").strip()
        if not reason:
            return self.message(request, allowed, 400, "rec_reason_required", cid)
        if len(reason) > REASON_MAX_CHARS:
            return self.message(request, allowed, 400, "rec_reason_too_long", cid)
        return allowed, cid, form, reason

    # -------------------------------------------------------------------------------------- the page

    async def page(self, request: Request) -> Response:
        allowed = await self.c.require(request, "show")
        if not isinstance(allowed, Session):
            return allowed
        cid = self.call_id(request)
        try:
            shown = await self.c.desk(allowed).show(cid)
        except (DeskError, StorageError) as exc:
            return self.failed(request, allowed, cid, exc)
        done = request.query_params.get("done", "")
        return self.c.render(
            request,
            "recording.html",
            csrf=allowed.csrf,
            account=allowed.account,
            role=allowed.role.value,
            here=request.url.path,
            notice=f"rec_done_{done}" if done in DONE_NOTICES else "",
            rec=self.view(shown, allowed),
        )

    def view(self, shown: Shown, session: Session) -> dict[str, Any]:
        """What the template shows; every string from the metadata goes through ``shown`` there."""
        role = session.role.value
        doc = shown.evidence.entry.doc
        caller = doc.get("caller") if isinstance(doc.get("caller"), Mapping) else {}
        assert isinstance(caller, Mapping)
        audio = doc.get("audio") if isinstance(doc.get("audio"), Mapping) else {}
        assert isinstance(audio, Mapping)
        pin = shown.evidence.pins.audio
        stored = shown.objects.get(pin.key) if shown.evidence.entry.audio_key else None
        capture_sha = _text(audio.get("sha256"))
        capture_bytes = audio.get("bytes") if isinstance(audio.get("bytes"), int) else None
        problems: list[str] = []
        if shown.evidence.entry.audio_key and stored is None:
            problems.append("rec_v_missing")
        if stored is not None:
            if capture_sha and stored.get("sha256") and stored.get("sha256") != capture_sha:
                problems.append("rec_v_meta_mismatch")
            if capture_bytes is not None and stored.get("bytes") != capture_bytes:
                problems.append("rec_v_size_mismatch")
        state = "rec_v_unverifiable" if not capture_sha else "rec_v_consistent"
        content = None
        if pin.version_id and capture_sha:
            cached = self.waveforms.cached((shown.evidence.entry.call_id, pin.version_id, capture_sha))
            content = cached.verification if cached is not None else None
        hold = shown.evidence.hold
        duration = doc.get("duration_s")
        number = caller.get("number")
        return {
            "call_id": shown.evidence.entry.call_id,
            "direction": doc.get("direction") if doc.get("direction") in ("inbound", "outbound") else None,
            "caller_number": masked(number) if role == "viewer" else (_text(number) or "-"),
            "caller_name": _text(caller.get("name")) or "-",
            "target": _text(doc.get("target")) or "-",
            "agent": _text(doc.get("agent")) or "-",
            "started": local_time(doc.get("started_at"), self.tz),
            "answered": local_time(doc.get("answered_at"), self.tz),
            "agent_answered": local_time(doc.get("agent_answered_at"), self.tz),
            "ended": local_time(doc.get("ended_at"), self.tz),
            "duration_s": float(duration) if isinstance(duration, int | float) else None,
            "end_reason": _text(doc.get("end_reason")) or "-",
            "flags": [f for f in doc.get("flags", []) if isinstance(f, str)][:20]
            if isinstance(doc.get("flags"), list)
            else [],
            "notice_played": doc.get("notice_played") is True,
            "timezone": self.tz.key,
            "has_audio": bool(shown.evidence.entry.audio_key) and stored is not None,
            "capture_sha": capture_sha,
            "capture_bytes": capture_bytes,
            "stored_sha": _text(stored.get("sha256")) if stored else None,
            "stored_bytes": stored.get("bytes") if stored else None,
            "version_id": pin.version_id,
            "version_source": pin.source,
            "state": state,
            "problems": problems,
            "content": content,
            "superseded": shown.superseded,
            "held": hold is not None,
            "hold_reason": hold.reason if hold else "",
            "hold_by": hold.by if hold else "",
            "hold_at": local_time(hold.at, self.tz) if hold else "",
            "markers": [
                {"kind": m.kind, "at_s": round(m.at_s, 3), "at": local_time(m.at, self.tz)}
                for m in markers(doc)
            ],
            "may": {action: role in PERMITS[action] for action in PERMITS},
        }

    # -------------------------------------------------------------------------------------- playback

    async def audio(self, request: Request) -> Response:
        """The pinned audio version, streamed with HTTP Range (206/416), never held whole."""
        allowed = await self.c.require(request, "play")
        if not isinstance(allowed, Session):
            return allowed
        cid = self.call_id(request)
        reader = self.reader()
        # One play record per session and call even when the browser opens two requests at once.
        grant = await self.granting.get(allowed.id, cid, lambda: self.grant(request, allowed, cid))
        if isinstance(grant, Response):
            return grant
        # The version id names the bytes (S3 never changes a version): a strong validator for If-Range.
        version = grant.playable.version_id or "unversioned"
        etag = '"' + re.sub(r"[^A-Za-z0-9._-]", "_", version)[:128] + '"'
        return await ranged_audio(
            request, reader, grant, etag, lambda exc: self.failed(request, allowed, cid, exc)
        )

    async def grant(self, request: Request, session: Session, cid: str) -> PlayGrant | Response:
        """The first audio request of a session for a call: ``play`` through the desk (on record before a
        byte is read), and the pinned version's size."""
        store = self.c.store
        assert store is not None
        try:
            playable = await self.c.desk(session).play(cid)
            info = await store.stat(playable.key, version_id=playable.version_id)
        except (DeskError, StorageError) as exc:
            return self.failed(request, session, cid, exc)
        if info is None:
            missing = DeskIntegrityFailure(f"EVIDENCE MISSING: {playable.key} version {playable.version_id}")
            return self.failed(request, session, cid, missing)
        log.info(
            "web event=play account=%s call_id=%s version_id=%s audit=%s",
            clean_log_value(session.account),
            cid,
            clean_log_value(playable.version_id or "-"),
            playable.audit_key,
        )
        return self.grants.add(session.id, cid, playable, info.size)

    async def waveform(self, request: Request) -> Response:
        """Peaks of the pinned audio (computed once per version, cached) and the content-hash check."""
        allowed = await self.c.require(request, "play")
        if not isinstance(allowed, Session):
            return allowed
        cid = self.call_id(request)
        reader = self.reader()
        desk = self.c.desk(allowed)
        store = self.c.store
        assert store is not None
        try:
            ev = await desk.evidence(await desk.locate(cid))
            pin = ev.pins.audio
            if not ev.entry.audio_key or not pin.present:
                raise DeskFailed(f"{cid} has no audio to draw")
            audio = ev.entry.doc.get("audio")
            capture = _text(audio.get("sha256")) if isinstance(audio, Mapping) else None
            key = (cid, pin.version_id or "", capture or "")
            found = self.waveforms.cached(key)
            if found is None:
                info = await store.stat(pin.key, version_id=pin.version_id)
                if info is None:
                    raise DeskIntegrityFailure(f"EVIDENCE MISSING: {pin.key} version {pin.version_id}")
                size = info.size

                async def compute() -> Waveform:
                    blocks = stream_blocks(reader, pin.key, 0, None, pin.version_id)
                    async with contextlib.aclosing(blocks):
                        return await compute_waveform(blocks, size, capture)

                found = await self.waveforms.get(key, compute)
                log.info(
                    "web event=waveform call_id=%s version_id=%s verification=%s",
                    cid,
                    clean_log_value(pin.version_id or "-"),
                    found.verification,
                )
        except (DeskError, StorageError) as exc:
            status = 404 if isinstance(exc, DeskNotFound) else 502 if isinstance(exc, StorageError) else 500
            log.warning("web event=waveform_failed call_id=%s error=%s", cid, type(exc).__name__)
            return JSONResponse({"problem": printable(str(exc), max_chars=300)}, status_code=status)
        return JSONResponse(found.as_json(), headers={"cache-control": "private, no-store"})

    # --------------------------------------------------------------------------------------- actions

    async def hold(self, request: Request) -> Response:
        async def run(desk: EvidenceDesk, cid: str, reason: str) -> str:
            held = await desk.hold(cid, reason=reason)
            return "hold" if held.result == "done" else "already_held"

        return await self._reasoned(request, "hold", run)

    async def release(self, request: Request) -> Response:
        async def run(desk: EvidenceDesk, cid: str, reason: str) -> str:
            released = await desk.release(cid, reason=reason)
            return "release" if released.released else "not_held"

        return await self._reasoned(request, "release", run)

    async def _reasoned(
        self, request: Request, action: str, run: Callable[[EvidenceDesk, str, str], Awaitable[str]]
    ) -> Response:
        """A checked form with its reason, the desk's action, then back to the page saying what was done."""
        checked = await self.action_form(request, action)
        if isinstance(checked, Response):
            return checked
        session, cid, _, reason = checked
        try:
            done = await run(self.c.desk(session), cid, reason)
        except (DeskError, StorageError) as exc:
            return self.failed(request, session, cid, exc)
        return RedirectResponse(f"/recordings/{cid}?done={done}", status_code=303)

    async def delete(self, request: Request) -> Response:
        """Refused while held (the desk's message, 409); the typed call id must match (else 400)."""
        checked = await self.action_form(request, "delete")
        if isinstance(checked, Response):
            return checked
        session, cid, form, reason = checked
        typed = form.get("confirm", "").strip()
        asked: list[str] = []

        def confirm(question: str) -> bool:
            asked.append(question)
            return typed == cid

        try:
            deleted = await self.c.desk(session).delete(cid, reason=reason, confirm=confirm)
        except DeskFailed as exc:
            if asked and typed != cid:
                return self.message(request, session, 400, "rec_confirm_mismatch", cid)
            return self.failed(request, session, cid, exc)
        except (DeskError, StorageError) as exc:
            return self.failed(request, session, cid, exc)
        log.info("web event=deleted account=%s call_id=%s", clean_log_value(session.account), cid)
        return self.message(request, session, 200, "rec_deleted", None, f"{cid}: {deleted.versions_deleted}")

    async def download(self, request: Request) -> Response:
        """The pinned audio, verified against capture by the desk (a mismatch sends nothing), as an
        attachment; the desk's file is a temporary one, removed once sent (or the client is gone)."""
        checked = await self.action_form(request, "download")
        if isinstance(checked, Response):
            return checked
        session, cid, _, reason = checked
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="kasuhara-web-"))
        out = tmp / f"{cid}.wav"
        try:
            got = await self.c.desk(session).download(cid, out, reason=reason)
        except (DeskError, StorageError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            return self.failed(request, session, cid, exc)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        headers = {
            "content-disposition": f'attachment; filename="{cid}.wav"',
            "content-length": str(got.bytes),
            "cache-control": "private, no-store",
            "x-kasuhara-sha256": got.sha256,
            "x-kasuhara-verification": got.outcome.value,
        }
        return ClosingStream(file_blocks(got.path, tmp), headers=headers, media_type="audio/wav")

    async def export(self, request: Request) -> Response:
        """The evidence zip of this call (desk.export: manifest, SHA256SUMS, signed when a key is set)."""
        checked = await self.action_form(request, "export")
        if isinstance(checked, Response):
            return checked
        session, cid, _, reason = checked
        try:
            signer = load_signer(self.c.cfg.admin.signing_key)
        except SigningError as exc:
            return self.message(request, session, 500, "rec_failed", cid, str(exc))
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="kasuhara-web-"))
        out = tmp / f"{cid}-evidence.zip"
        try:
            exported = await self.c.desk(session).export(out, calls=[cid], reason=reason, signer=signer)
        except (DeskError, StorageError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            return self.failed(request, session, cid, exc)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if exported is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return self.failed(request, session, cid, DeskNotFound(f"no recording with call id {cid!r}"))
        size = await asyncio.to_thread(lambda: out.stat().st_size)
        headers = {
            "content-disposition": f'attachment; filename="{out.name}"',
            "content-length": str(size),
            "cache-control": "private, no-store",
            "x-kasuhara-sha256": exported.result.sha256,
            "x-kasuhara-verification": exported.outcome.value,
            "x-kasuhara-signed": "yes" if signer is not None else "no",
        }
        return ClosingStream(file_blocks(out, tmp), headers=headers, media_type="application/zip")

    async def download_link(self, request: Request) -> Response:
        """A typed or bookmarked download URL: the role is refused here (403); an admin is sent to the
        page, where the download is a POST with a reason (an action never happens on a GET)."""
        allowed = await self.c.require(request, "download")
        if not isinstance(allowed, Session):
            return allowed
        cid = self.call_id(request)
        return RedirectResponse(f"/recordings/{cid}", status_code=303)


def routes(console: Console) -> list[BaseRoute]:
    pages = RecordingPages(console)
    return [
        Route("/recordings/{call_id}", pages.page, methods=["GET"]),
        Route("/recordings/{call_id}/audio", pages.audio, methods=["GET"]),
        Route("/recordings/{call_id}/waveform", pages.waveform, methods=["GET"]),
        Route("/recordings/{call_id}/hold", pages.hold, methods=["POST"]),
        Route("/recordings/{call_id}/release", pages.release, methods=["POST"]),
        Route("/recordings/{call_id}/download", pages.download, methods=["POST"]),
        Route("/recordings/{call_id}/download", pages.download_link, methods=["GET"]),
        Route("/recordings/{call_id}/export", pages.export, methods=["POST"]),
        Route("/recordings/{call_id}/delete", pages.delete, methods=["POST"]),
    ]
