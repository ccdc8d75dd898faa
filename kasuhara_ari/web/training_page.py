"""The training library in the console (``/training``): the clips, a player, export, and making a clip from
the recording page of a held or flagged call.

A face of :class:`~kasuhara_ari.training.library.TrainingLibrary` like ``kasuhara training``: the same role
checks (the desk's ``training_*`` permits: supervisor and admin; viewers get 403 and never see the
library), the same audit records and the same refusals (a call neither held nor flagged, a title or note
naming the caller). Which call a clip came from is shown to admins only (``training-sources/``, which only
the admin S3 key may read anyway).

Playback: the first audio request of a session for a clip goes through ``library.play`` (audited
``training_play`` before a byte is read, and the clip verified against its sha256); the seeks that follow
reuse that grant (:class:`~kasuhara_ari.web.playback.PlayGrants`, as the recording page does) and are
served with HTTP Range straight from S3.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..evidence.desk import DeskError, DeskNotFound, DeskRefused, EvidenceDesk, Playable
from ..safe import clean_log_value, is_safe_call_id
from ..storage import StorageError
from ..training.clipper import parse_offset
from ..training.library import Clip, TrainingLibrary, clip_id_of, clip_keys
from .audio_stream import ClosingStream, Granting, RangeReader, file_blocks, ranged_audio
from .console import Console, FormRejected
from .playback import PlayGrant, PlayGrants
from .recordings import REASON_MAX_CHARS, local_time, zone
from .sessions import Session

log = logging.getLogger(__name__)

#: Outcomes a redirect back to the page may announce (``?done=``): fixed words, never user text.
DONE_NOTICES = frozenset({"add"})
#: Clips one export may hold (the form reader takes at most 32 fields).
MAX_EXPORT = 25


def clip_id(request: Request) -> str:
    try:
        return clip_id_of(str(request.path_params["clip_id"]))
    except ValueError:
        raise HTTPException(404) from None


class TrainingPages:
    """The handlers; ``self.c`` is the console core."""

    def __init__(self, console: Console) -> None:
        self.c = console
        self.grants = PlayGrants(console.clock)
        self.granting = Granting(self.grants)
        self.tz = zone(console.cfg.general.timezone)

    def library(self, session: Session) -> TrainingLibrary:
        desk: EvidenceDesk = self.c.desk(session)
        return TrainingLibrary(desk, pitch_cents=self.c.cfg.training.pitch_cents)

    def message(
        self, request: Request, session: Session, status: int, key: str, detail: str = "", call_id: str = ""
    ) -> Response:
        return self.c.render(
            request,
            "recording_message.html",
            status,
            message_key=key,
            detail=detail,
            call_id=call_id or None,
            csrf=session.csrf,
        )

    def failed(self, request: Request, session: Session, exc: Exception, call_id: str = "") -> Response:
        """A library, desk or storage error as a page, with the status its kind means."""
        if isinstance(exc, DeskNotFound):
            status, key = 404, "training_not_found" if not call_id else "rec_not_found"
        elif isinstance(exc, DeskRefused):
            status, key = 409, "training_add_refused"
        elif isinstance(exc, ValueError):
            status, key = 400, "training_add_refused" if call_id else "training_bad_request"
        elif isinstance(exc, DeskError):
            status, key = 500, "training_failed"
        else:
            status, key = 502, "rec_storage_failed"
        log.warning(
            "web event=training_refused account=%s status=%d error=%s message=%s",
            clean_log_value(session.account),
            status,
            type(exc).__name__,
            clean_log_value(str(exc)),
        )
        return self.message(request, session, status, key, str(exc), call_id)

    async def sources(self, clips: list[Clip]) -> dict[str, str]:
        """Each clip's source call id (admins only: the caller is in ``training-sources/``)."""
        store = self.c.store
        assert store is not None
        found: dict[str, str] = {}
        for c in clips:
            try:
                data = await store.get_bytes(clip_keys(c.clip_id)[2], max_bytes=64 * 1024)
                doc = json.loads(data) if data is not None else None
            except (StorageError, ValueError):
                continue
            call_id = doc.get("call_id") if isinstance(doc, dict) else None
            if isinstance(call_id, str) and is_safe_call_id(call_id):
                found[c.clip_id] = call_id
        return found

    # -------------------------------------------------------------------------------------- the page

    async def page(self, request: Request) -> Response:
        allowed = await self.c.require(request, "training_list")
        if not isinstance(allowed, Session):
            return allowed
        try:
            clips, _ = await self.library(allowed).clips(reason="console")
            sources = await self.sources(clips) if allowed.role.value == "admin" else {}
        except (DeskError, StorageError) as exc:
            return self.failed(request, allowed, exc)
        done = request.query_params.get("done", "")
        rows: list[dict[str, Any]] = [
            {
                "clip_id": c.clip_id,
                "title": c.title,
                "note": c.note,
                "duration_s": c.duration_s,
                "anonymised": c.anonymised,
                "created": local_time(c.created_at, self.tz),
                "created_by": c.created_by,
                "source": sources.get(c.clip_id, ""),
            }
            for c in reversed(clips)  # newest first
        ]
        return self.c.render(
            request,
            "training.html",
            csrf=allowed.csrf,
            account=allowed.account,
            role=allowed.role.value,
            here="/training",
            rows=rows,
            may_export=allowed.role.value in ("supervisor", "admin"),
            notice=f"training_done_{done}" if done in DONE_NOTICES else "",
        )

    # -------------------------------------------------------------------------------------- playback

    async def audio(self, request: Request) -> Response:
        """The clip's audio with HTTP Range (206/416), as the recording page streams a recording."""
        allowed = await self.c.require(request, "training_play")
        if not isinstance(allowed, Session):
            return allowed
        cid = clip_id(request)
        store = self.c.store
        if store is None or self.c.events is None:
            raise HTTPException(503)
        if not isinstance(store, RangeReader):
            raise HTTPException(501)
        grant = await self.granting.get(allowed.id, cid, lambda: self.grant(request, allowed, cid))
        if isinstance(grant, Response):
            return grant
        etag = f'"{grant.playable.sha256}"'  # a clip is written once: its sha256 names its bytes
        return await ranged_audio(request, store, grant, etag, lambda exc: self.failed(request, allowed, exc))

    async def grant(self, request: Request, session: Session, cid: str) -> PlayGrant | Response:
        """The first audio request of a session for a clip: ``library.play`` (``training_play`` on
        record first, the clip checked against its sha256), then later seeks reuse the grant."""
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="kasuhara-web-"))
        try:
            clip = await self.library(session).play(cid, tmp / f"{cid}.wav", reason="console")
        except (DeskError, StorageError) as exc:
            return self.failed(request, session, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("web event=training_play account=%s clip_id=%s", clean_log_value(session.account), cid)
        playable = Playable(
            call_id=cid,
            key=clip.audio_key,
            version_id=None,
            sha256=clip.sha256,
            bytes=clip.bytes,
            audit_key="",
            superseded=[],
        )
        return self.grants.add(session.id, cid, playable, clip.bytes)

    # --------------------------------------------------------------------------------------- actions

    async def export(self, request: Request) -> Response:
        """A zip of the ticked clips (``library.export``: WAV + metadata each, SHA256SUMS, manifest)."""
        posted = await self.c.posted(request, "training_export")
        if isinstance(posted, Response):
            return posted
        allowed, form = posted
        try:
            ticked = [k.removeprefix("clip-") for k, v in form.items() if k.startswith("clip-") and v]
            ids = [clip_id_of(c) for c in ticked]
        except ValueError:
            return self.message(request, allowed, 400, "training_bad_request")
        reason = form.get("reason", "").strip()
        if not ids or len(ids) > MAX_EXPORT or len(reason) > REASON_MAX_CHARS:
            return self.message(request, allowed, 400, "training_bad_request")
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="kasuhara-web-"))
        out = tmp / "training-clips.zip"
        try:
            await self.library(allowed).export(ids, out, reason=reason)
        except (DeskError, StorageError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            return self.failed(request, allowed, exc)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = await asyncio.to_thread(lambda: out.stat().st_size)
        headers = {
            "content-disposition": 'attachment; filename="training-clips.zip"',
            "content-length": str(size),
            "cache-control": "private, no-store",
        }
        return ClosingStream(file_blocks(out, tmp), headers=headers, media_type="application/zip")

    async def add(self, request: Request) -> Response:
        """A clip from the recording page (``library.add``: held or flagged calls only; the title and
        note never name the caller)."""
        allowed = await self.c.require(request, "training_add")
        if not isinstance(allowed, Session):
            return allowed
        call_id = request.path_params["call_id"]
        if not isinstance(call_id, str) or not is_safe_call_id(call_id):
            raise HTTPException(404)
        try:
            form = await self.c.checked_form(request, allowed)
        except FormRejected as exc:
            return self.c.rejected(request, exc)
        try:
            start_s = parse_offset(form.get("from", ""))
            end_s = parse_offset(form.get("to", ""))
            made = await self.library(allowed).add(
                call_id,
                start_s,
                end_s,
                title=form.get("title", ""),
                note=form.get("note", ""),
                anonymise=form.get("anonymise", "") == "1",
                reason=form.get("reason", "").strip()[:REASON_MAX_CHARS],
            )
        except (ValueError, DeskError, StorageError) as exc:
            return self.failed(request, allowed, exc, call_id)
        log.info(
            "web event=training_add account=%s clip_id=%s", clean_log_value(allowed.account), made.clip_id
        )
        return RedirectResponse("/training?done=add", status_code=303)


def routes(console: Console) -> list[BaseRoute]:
    pages = TrainingPages(console)
    return [
        Route("/training", pages.page, methods=["GET"]),
        Route("/training/{clip_id}/audio", pages.audio, methods=["GET"]),
        Route("/training/export", pages.export, methods=["POST"]),
        Route("/recordings/{call_id}/training", pages.add, methods=["POST"]),
    ]
