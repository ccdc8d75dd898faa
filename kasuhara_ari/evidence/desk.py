"""The evidence desk: one service layer for locating, showing, playing, downloading, exporting, holding,
releasing and deleting recordings, each with its role check and its audit record.

Every face calls this (``kasuhara recordings`` now, the web console later), so audit records, role checks
and outcomes are the same whichever face is used. The desk never prints, prompts or exits: it returns
typed results and raises :class:`DeskError` kinds whose message is what the operator is told; a face maps
them to exit codes or HTTP statuses. What does not stop an action (an audit record that could not be
written after the fact, MQTT down, unreadable metadata left out of an export) goes to the face's ``warn``.
Storage errors (:class:`~kasuhara_ari.storage.StorageError` kinds) propagate unchanged: the face knows
which endpoint it talked to.

Audit discipline: an action that hands out evidence or cannot be undone (play, download, export,
release, delete) writes its record FIRST and is refused if that record cannot be written; the outcome
follows in a second record naming the first. Reads (list, show) and hold are audited best effort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from ..audit import AuditLog, AuditRecord, CommandEvents
from ..config import Config
from ..events import EventSink, now_iso
from ..export import EvidenceExport, EvidenceMismatch, ExportError, ExportItem, ExportResult, verdict
from ..safe import printable
from ..search import (
    Catalog,
    CorruptMetadata,
    Entry,
    Filters,
    Located,
    Unreadable,
    parse_metadata,
    started_of,
)
from ..signing import ExportSigner
from ..storage import (
    DeletionGuard,
    HoldRecord,
    MinioStore,
    ObjectRef,
    ObjectStore,
    Pins,
    RecordingHolds,
    StorageError,
    hash_file,
    pin_versions,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ roles

Role = Literal["viewer", "supervisor", "admin", "service"]
ROLES: tuple[Role, ...] = ("viewer", "supervisor", "admin", "service")

_ANYONE: frozenset[Role] = frozenset(ROLES)
_ADMIN: frozenset[Role] = frozenset({"admin"})

#: Who may do what. ``service``: the CLI run without the [admin] keys (on the [storage] keys), which has
#: always been able to list, show and hold; the S3 role policies enforce the same on the server.
#: ``viewer`` and ``supervisor`` are the web console's roles (issue 13); no face produces them yet.
PERMITS: Mapping[str, frozenset[Role]] = {
    "list": _ANYONE,
    "show": _ANYONE,
    "play": frozenset({"supervisor", "admin"}),
    "hold": frozenset({"supervisor", "admin", "service"}),
    "download": _ADMIN,
    "export": _ADMIN,
    "release": _ADMIN,
    "delete": _ADMIN,
    "callers_add": _ADMIN,
    "callers_remove": _ADMIN,
    "users_admin": _ADMIN,  # kasuhara users add/passwd/disable/enable/role (console accounts)
    "supervise": frozenset({"supervisor", "admin"}),  # join a live call from the console's board
    # care for agents (kasuhara care): the monthly report, follow-up notes, ending a pause early
    "care_report": frozenset({"supervisor", "admin"}),
    "care_note": frozenset({"supervisor", "admin"}),
    "care_resume": frozenset({"supervisor", "admin"}),
    # the training library (kasuhara_ari/training): trainers are supervisors and admins; viewers never
    "training_add": frozenset({"supervisor", "admin"}),
    "training_list": frozenset({"supervisor", "admin"}),
    "training_play": frozenset({"supervisor", "admin"}),
    "training_export": frozenset({"supervisor", "admin"}),
}


@dataclass(frozen=True)
class Principal:
    """Who is acting (the name written into audit records) and in which role."""

    name: str
    role: Role
    #: What this principal lacks for more, said in a refusal (the CLI: which [admin] keys are not set).
    lacking: str = ""

    def may(self, action: str) -> bool:
        return self.role in PERMITS.get(action, frozenset())


# ----------------------------------------------------------------------------------------------- errors


class DeskError(Exception):
    """An expected end of a desk operation; ``str(exc)`` is what the operator is told."""


class DeskRefused(DeskError):
    """Not permitted: the principal's role, a hold, or the S3 server refusing this key a legal hold."""

    @classmethod
    def of(cls, principal: Principal, action: str, doing: str = "") -> DeskRefused:
        doing = doing or action
        if principal.lacking:
            return cls(f"refused: {doing} needs {principal.lacking}")
        roles = " or ".join(r for r in ROLES if r in PERMITS.get(action, frozenset()))
        if not roles:
            return cls(f"refused: {doing} is not an action of the evidence desk")
        return cls(f"refused: {doing} needs the {roles} role; {principal.name} is {principal.role}")


class DeskNotFound(DeskError):
    """No recording with that call id (on the days looked at)."""


class DeskFailed(DeskError):
    """The operation could not be done, or was not confirmed; nothing (more) happened."""


class DeskIntegrityFailure(DeskFailed):
    """The evidence does not match what capture recorded, or a version it depends on is gone."""


def permit(principal: Principal, action: str, *, doing: str = "") -> None:
    """:class:`DeskRefused` unless ``principal`` may do ``action``. ``doing``: how the face names the
    operation in the message (default: the action). Faces call it before opening anything, so a refusal
    costs no request; every desk operation checks again."""
    if not principal.may(action):
        raise DeskRefused.of(principal, action, doing)


# --------------------------------------------------------------------------------------------- outcomes


class Outcome(StrEnum):
    """How an operation that ran ended (the audit ``result`` of its outcome record)."""

    DONE = "done"
    #: Done, but a pinned object has a later version or delete marker: possible tampering.
    SUPERSEDED = "superseded"
    #: Done, but a file has no sha256 recorded at capture: missing provenance, not a mismatch.
    UNVERIFIABLE = "unverifiable"
    #: Done (an export's zip is written and says which), but a file does not match its capture hash or a
    #: pinned version is missing.
    INTEGRITY_FAILURE = "integrity_failure"


@dataclass(frozen=True)
class Evidence:
    """A call as evidence: the pinned versions, the hold record, the pinned metadata's entry."""

    pins: Pins
    hold: HoldRecord | None
    entry: Entry

    def superseded(self) -> list[str]:
        """One line per pinned object with a later version or delete marker (possible tampering)."""
        lines = []
        for pin in (self.pins.audio, self.pins.metadata):
            if pin.superseded:
                newest = pin.later[0]
                kind = "a delete marker" if newest.is_delete_marker else f"version {newest.version_id}"
                lines.append(
                    f"SUPERSEDED — possible tampering: {pin.key} has {len(pin.later)} later version(s) "
                    f"(newest: {kind}); the evidence is version {pin.version_id} ({pin.source})"
                )
        return lines


@dataclass(frozen=True)
class Shown:
    """``show``: the evidence, and per pinned object what S3 holds (``None``: no such version)."""

    found: Located
    evidence: Evidence
    objects: Mapping[str, Mapping[str, Any] | None]
    superseded: list[str]

    @property
    def outcome(self) -> Outcome:
        return Outcome.SUPERSEDED if self.superseded else Outcome.DONE


@dataclass(frozen=True)
class Playable:
    """``play``: the pinned audio version a face may stream (its ``play`` record is already written)."""

    call_id: str
    key: str
    version_id: str | None
    #: The sha256 recorded at capture (metadata), if any; a face that streams cannot verify it.
    sha256: str | None
    bytes: int | None
    audit_key: str
    superseded: list[str]


@dataclass(frozen=True)
class Downloaded:
    """``download``: the file written, its hash and how it compares with capture."""

    path: Path
    sha256: str
    bytes: int
    #: ``verified`` (matches capture) or ``unverifiable`` (nothing recorded to compare with).
    verification: str
    superseded: list[str]

    @property
    def outcome(self) -> Outcome:
        if self.superseded:
            return Outcome.SUPERSEDED
        return Outcome.DONE if self.verification == "verified" else Outcome.UNVERIFIABLE


@dataclass(frozen=True)
class Exported:
    """``export``: the committed zip, and its verdict (the zip is written whatever the verdict)."""

    result: ExportResult
    outcome: Outcome
    verdict: str


@dataclass(frozen=True)
class Held:
    """``hold``: ``result`` is ``done`` (hold record written) or ``already_held`` (legal holds confirmed)."""

    call_id: str
    result: str
    legal_holds: tuple[str, ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Released:
    """``release``: ``released`` False: it was not held, nothing was done."""

    call_id: str
    released: bool
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Deleted:
    call_id: str
    versions_deleted: int


def export_verdict(result: ExportResult) -> tuple[Outcome, str]:
    """The outcome of an export and why: a mismatch or a missing pinned version is an integrity failure;
    a later version of an exported key is possible tampering; files without a capture hash are
    unverifiable. The zip is written in every case, its manifest saying which file is which."""
    v = result.verification
    if v.get("mismatch") or v.get("missing"):
        return Outcome.INTEGRITY_FAILURE, (
            f"INTEGRITY FAILURE: {v.get('mismatch', 0)} file(s) do not match the hash recorded at capture, "
            f"{v.get('missing', 0)} pinned version(s) missing (see 'verification' in manifest.json)"
        )
    if result.superseded:
        return Outcome.SUPERSEDED, (
            f"SUPERSEDED: possible tampering: a later version exists of {', '.join(result.superseded)}; "
            "the pinned versions were exported (see 'superseded_by' in manifest.json)"
        )
    if v.get("unverifiable"):
        return Outcome.UNVERIFIABLE, (
            f"UNVERIFIABLE: {v['unverifiable']} file(s) have no sha256 recorded at capture (missing "
            "provenance, not a mismatch; see 'verification' in manifest.json)"
        )
    return Outcome.DONE, "verified"


def call_target(found: Located) -> dict[str, Any]:
    """The ``target`` of an audit record about one call."""
    return {"call_id": found.keys.call_id, "keys": [found.keys.audio, found.keys.metadata]}


#: ``progress(length, label)``: a context giving ``step(n)``; a face draws a bar, the default nothing.
Progress = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _log_warning(message: str) -> None:
    log.warning("desk event=warning message=%s", printable(message, max_chars=500))


# -------------------------------------------------------------------------------------------------- desk


class EvidenceDesk:
    """The operations on recordings for one principal over one audit session (see the module doc)."""

    def __init__(
        self,
        store: ObjectStore,
        events: EventSink,
        principal: Principal,
        *,
        warn: Callable[[str], None] | None = None,
        progress: Progress = no_progress,
    ) -> None:
        self.store = store
        self.principal = principal
        self.audit = AuditLog(store, events, by=principal.name)
        self.catalog = Catalog(store)
        self.warn = warn or _log_warning
        self.progress = progress

    # -- audit

    async def note(self, record: AuditRecord) -> None:
        """Write an audit record, best effort: a failure is a warning (the action already happened)."""
        try:
            await self.audit.write(record)
        except StorageError as exc:
            self.warn(f"audit record could not be written: {exc}")

    async def audit_first(
        self,
        action: str,
        *,
        reason: str,
        target: Mapping[str, Any],
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """The record written BEFORE an action that hands out evidence or cannot be undone. If it cannot
        be written the action is refused (:class:`DeskFailed`): nothing happens unaudited."""
        record = self.audit.new(action, reason=reason, result="started", target=target, details=details)
        try:
            return await self.audit.write(record)
        except StorageError as exc:
            raise DeskFailed(
                f"refused: the audit record could not be written ({exc}); nothing was done"
            ) from exc

    async def audit_outcome(self, first: AuditRecord, result: str, details: Mapping[str, Any]) -> None:
        """The follow-up record with how an audited action ended (best effort: the action is on record)."""
        await self.note(
            self.audit.new(
                first.action,
                reason=first.reason,
                result=result,
                target=first.target,
                details={**details, "started_record": first.key},
            )
        )

    # -- finding

    def _permit(self, action: str) -> None:
        permit(self.principal, action)

    async def locate(self, call_id: str, days: Iterable[date] = ()) -> Located:
        """Where a call's objects are; :class:`DeskNotFound` if nowhere on the candidate days."""
        days = list(days)
        found = await self.catalog.locate(call_id, days=days)
        if found is None:
            hint = "" if days else "; if the id carries no timestamp, give the call's date with --date"
            raise DeskNotFound(f"no recording with call id {call_id!r}{hint}")
        return found

    async def evidence(self, found: Located) -> Evidence:
        """Read a call at its pinned versions (never simply the latest: a later PUT is not the evidence)."""
        cid = found.keys.call_id
        if not found.metadata:
            raise DeskFailed(f"{cid}: audio without metadata at {found.keys.audio}")
        hold = await RecordingHolds(self.store).record(cid)
        pins = await pin_versions(self.store, found.keys, hold.versions if hold is not None else {})
        meta = pins.metadata
        data = None
        if meta.present:
            data = await self.store.get_bytes(found.keys.metadata, version_id=meta.version_id)
        if data is None:
            raise DeskIntegrityFailure(
                f"EVIDENCE MISSING: {found.keys.metadata} version {meta.version_id} ({meta.source})"
            )
        try:
            doc = parse_metadata(data, cid)
            started = started_of(doc)
        except ValueError as exc:
            raise DeskFailed(f"{cid}: metadata {found.keys.metadata} is unreadable: {exc}") from exc
        audio = doc.get("audio")
        audio_key = audio.get("key") if isinstance(audio, Mapping) else None
        entry = Entry(
            call_id=cid,
            metadata_key=found.keys.metadata,
            audio_key=audio_key if isinstance(audio_key, str) else None,
            started_at=started,
            doc=doc,
            held=hold is not None,
        )
        return Evidence(pins, hold, entry)

    async def search(
        self,
        f: Filters,
        *,
        reason: str = "",
        on_day: Callable[[date], None] | None = None,
        on_problem: Callable[[Unreadable], None] | None = None,
    ) -> AsyncIterator[Entry]:
        """The recordings matching ``f``; once all are yielded, one ``list`` record with the count."""
        self._permit("list")
        count = 0
        async for e in self.catalog.search(f, on_day=on_day, on_problem=on_problem):
            count += 1
            yield e
        await self.note(
            self.audit.new("list", reason=reason, target=f.as_dict(), details={"counts": {"listed": count}})
        )

    # -- reading

    async def show(self, call_id: str, *, days: Iterable[date] = (), reason: str = "") -> Shown:
        """One recording at its pinned versions, with what S3 holds of each."""
        self._permit("show")
        found = await self.locate(call_id, days)
        ev = await self.evidence(found)
        objects: dict[str, Mapping[str, Any] | None] = {}
        for pin in (ev.pins.audio, ev.pins.metadata):
            info = await self.store.stat(pin.key, version_id=pin.version_id) if pin.present else None
            objects[pin.key] = (
                None
                if info is None
                else {
                    "bytes": info.size,
                    "sha256": info.metadata.get("sha256"),
                    "version_id": info.version_id,
                    "version_source": pin.source,
                    "legal_hold": info.legal_hold,
                    "superseded_by": [v.version_id for v in pin.later],
                }
            )
        superseded = ev.superseded()
        await self.note(
            self.audit.new(
                "show",
                reason=reason,
                result="superseded" if superseded else "done",
                target=call_target(found),
            )
        )
        return Shown(found, ev, objects, superseded)

    async def _audio(self, call_id: str, days: Iterable[date]) -> tuple[Located, Evidence, Mapping[str, Any]]:
        found = await self.locate(call_id, days)
        ev = await self.evidence(found)
        audio = ev.entry.doc.get("audio") if isinstance(ev.entry.doc.get("audio"), Mapping) else {}
        assert isinstance(audio, Mapping)
        if not ev.entry.audio_key:
            raise DeskFailed(f"{call_id} has no audio (status: {audio.get('status') or 'none'})")
        pin = ev.pins.audio
        if not pin.present:
            raise DeskIntegrityFailure(f"EVIDENCE MISSING: {pin.key} version {pin.version_id} ({pin.source})")
        return found, ev, audio

    async def play(self, call_id: str, *, days: Iterable[date] = (), reason: str = "") -> Playable:
        """The pinned audio to stream, on record as ``play`` (not ``download``) before a byte is read.
        Streaming itself is the face's (the web console's Range requests)."""
        self._permit("play")
        found, ev, audio = await self._audio(call_id, days)
        pin = ev.pins.audio
        first = await self.audit_first(
            "play", reason=reason, target=call_target(found), details={"version_id": pin.version_id}
        )
        sha = audio.get("sha256")
        size = audio.get("bytes")
        return Playable(
            call_id=found.keys.call_id,
            key=pin.key,
            version_id=pin.version_id,
            sha256=sha if isinstance(sha, str) else None,
            bytes=size if isinstance(size, int) else None,
            audit_key=first.key,
            superseded=ev.superseded(),
        )

    async def download(
        self, call_id: str, out: Path, *, days: Iterable[date] = (), reason: str
    ) -> Downloaded:
        """Write the pinned audio to ``out``, verified against the sha256 recorded at capture; a mismatch
        writes nothing (:class:`DeskIntegrityFailure`)."""
        self._permit("download")
        found, ev, audio = await self._audio(call_id, days)
        pin = ev.pins.audio
        # On record before a byte is handed out; refused if that cannot be written.
        first = await self.audit_first(
            "download",
            reason=reason,
            target=call_target(found),
            details={"version_id": pin.version_id, "file": out.name},
        )
        tmp = out.with_name(f".{out.name}.{os.getpid()}.download")
        try:
            info = await self.store.get_to_file(pin.key, tmp, version_id=pin.version_id)
            size, sha = await asyncio.to_thread(hash_file, tmp)
            recorded = [audio.get("sha256"), info.metadata.get("sha256")]
            check = verdict(sha, recorded)
            if isinstance(audio.get("bytes"), int) and audio.get("bytes") != size:
                check = "mismatch"
            facts = {"sha256": sha, "bytes": size, "version_id": info.version_id, "verification": check}
            if check == "mismatch":
                await self.audit_outcome(first, "integrity_failure", {**facts, "recorded": recorded})
                raise DeskIntegrityFailure(
                    f"INTEGRITY FAILURE: {pin.key} version {pin.version_id} hashes to {sha} ({size} "
                    f"bytes), but capture recorded {', '.join(str(r) for r in recorded if r)}; "
                    "nothing written"
                )
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        superseded = ev.superseded()
        await self.audit_outcome(
            first, "superseded" if superseded else check, {**facts, "superseded": superseded}
        )
        return Downloaded(out, sha, size, check, superseded)

    async def export(
        self,
        out: Path,
        *,
        calls: Sequence[str] = (),
        filters: Filters | None = None,
        reason: str,
        signer: ExportSigner | None = None,
    ) -> Exported | None:
        """An evidence zip of ``calls`` plus what ``filters`` match, at the pinned versions. ``None``:
        nothing matched (audited as ``empty``). Any verdict still writes the zip (see
        :func:`export_verdict`); an error before the zip is complete writes none (:class:`DeskFailed`)."""
        self._permit("export")
        items: list[ExportItem] = []
        for cid in calls:
            found = await self.locate(cid)
            if not found.metadata:
                raise DeskFailed(f"{cid}: audio without metadata at {found.keys.audio}")
            items.append(ExportItem(cid, found.keys.metadata))
        problems: list[Unreadable] = []
        if filters is not None:
            days = (filters.end.astimezone(UTC).date() - filters.start.astimezone(UTC).date()).days + 1
            with self.progress(days, "searching") as step:
                async for e in self.catalog.search(
                    filters, on_day=lambda _d: step(1), on_problem=problems.append
                ):
                    if e.call_id not in calls:
                        items.append(ExportItem(e.call_id, e.metadata_key))
        for p in problems:
            self.warn(
                f"not exported, unreadable metadata: {printable(p.key, max_chars=300)}: "
                f"{printable(p.problem)}"
            )
        query: dict[str, Any] = dict(filters.as_dict()) if filters is not None else {}
        if calls:
            query["calls"] = list(calls)
        target = {**query, "call_ids": [i.call_id for i in items]}
        if not items:
            await self.note(self.audit.new("export", reason=reason, result="empty", target=target))
            return None
        # On record before anything is read; its key goes into the manifest.
        first = await self.audit_first("export", reason=reason, target=target, details={"file": out.name})
        with self.progress(len(items), "exporting") as step:
            exporter = EvidenceExport(
                self.store,
                created_by=self.audit.by,
                query=query,
                reason=reason,
                progress=step,
                audit_key=first.key,
            )
            exporter.signer = signer
            try:
                result = await exporter.write(items, out)
            except (EvidenceMismatch, ExportError) as exc:
                await self.audit_outcome(first, "failed", {"error": str(exc)})
                raise DeskFailed(f"export aborted, no zip written: {exc}") from exc
        EvidenceExport.commit(result, out)
        outcome, verdict_text = export_verdict(result)
        await self.audit_outcome(
            first,
            outcome.value,
            {
                "file": out.name,
                "zip_sha256": result.sha256,
                "counts": {"recordings": result.recordings, "files": result.files, "bytes": result.bytes},
                "verification": dict(result.verification),
                "superseded": list(result.superseded),
            },
        )
        return Exported(result, outcome, verdict_text)

    # -- holds and deletion

    async def hold(self, call_id: str, *, days: Iterable[date] = (), reason: str) -> Held:
        """Hold record + S3 legal holds; retention and delete then refuse the recording. Refused
        (:class:`DeskRefused`) if the server refuses this key the legal hold; a version deleted before
        the hold took effect is :class:`DeskIntegrityFailure` (EVIDENCE LOST), never "held"."""
        self._permit("hold")
        found = await self.locate(call_id, days)
        cid = found.keys.call_id
        started = None
        if found.metadata:
            # Unreadable metadata must not stop a hold: the hold is what keeps the evidence.
            with contextlib.suppress(CorruptMetadata):
                started = (await self.catalog.entry(found)).doc.get("started_at")
        record = HoldRecord.create(cid, reason, self.audit.by, at=now_iso(), started_at=started)
        holds = RecordingHolds(self.store)
        outcome = await holds.apply(record, found.keys)
        # Re-read what the hold protects: a retention sweep that deleted a version between its check of
        # the hold records and this hold cannot be undone, and must not be reported as "held".
        refused = sorted(outcome.refused)
        lost = sorted(set(outcome.lost) | set(await holds.verify(outcome.pinned)) - set(refused))
        result = (
            "lost" if lost else "refused" if refused else "done" if outcome.record_written else "already_held"
        )
        await self.note(
            self.audit.new(
                "hold",
                reason=reason,
                result=result,
                target=call_target(found),
                details={
                    "legal_holds": list(outcome.held_keys),
                    "versions": dict(outcome.pinned),
                    "lost": lost,
                    "refused": refused,
                },
            )
        )
        if refused and not lost:
            # This key may not place legal holds (the service key on Ceph RGW): the record stands.
            raise DeskRefused(
                f"refused: {cid}: the hold record is written, but the server refused the S3 legal hold "
                f"on {', '.join(refused)} to this key; run it with the admin key"
            )
        if lost:
            raise DeskIntegrityFailure(
                f"EVIDENCE LOST: {cid}: the hold record is written, but {', '.join(lost)} no longer "
                "exists in the version the hold pins (deleted before the hold took effect, e.g. by a "
                "retention sweep running at the same time)"
            )
        return Held(cid, result, tuple(outcome.held_keys), dict(outcome.pinned))

    async def release(self, call_id: str, *, days: Iterable[date] = (), reason: str) -> Released:
        """Legal holds off, hold record removed; on record before a single legal hold is lifted."""
        self._permit("release")
        found = await self.locate(call_id, days)
        cid = found.keys.call_id
        holds = RecordingHolds(self.store)
        previous = await holds.record(cid)
        why = await DeletionGuard(self.store).why_not(cid, [found.keys.audio, found.keys.metadata])
        if previous is None and why is None:
            await self.note(
                self.audit.new("release", reason=reason, result="not_held", target=call_target(found))
            )
            return Released(cid, released=False)
        hold_was = previous.as_metadata_hold() if previous else None
        first = await self.audit_first(
            "release",
            reason=reason,
            target=call_target(found),
            details={"hold_was": hold_was, "versions": dict(previous.versions) if previous else {}},
        )
        released = await holds.release(found.keys)
        await self.audit_outcome(first, "done", {"released": list(released), "hold_was": hold_was})
        return Released(cid, released=True, keys=tuple(released))

    async def delete(
        self,
        call_id: str,
        *,
        days: Iterable[date] = (),
        reason: str,
        confirm: Callable[[str], bool] | None = None,
    ) -> Deleted:
        """Every version of a call's audio and metadata, through the :class:`DeletionGuard`. Refused
        while held (audited as ``refused``). ``confirm(question)`` is asked once the hold check passed
        (``None``: confirmed already); a no is :class:`DeskFailed`, nothing deleted."""
        self._permit("delete")
        found = await self.locate(call_id, days)
        cid = found.keys.call_id
        # Early deletion of a recording still under the bucket's default GOVERNANCE retention: the
        # admin's delete (alone) sends the bypass header; holds are still refused by the guard.
        guard = DeletionGuard(self.store, bypass_governance=True)
        target = call_target(found)
        why = await guard.why_not(cid, [found.keys.audio, found.keys.metadata])
        if why is not None:
            await self.note(
                self.audit.new("delete", reason=reason, result="refused", target=target, details={"why": why})
            )
            raise DeskRefused(f"refused: {cid} is on hold ({why}); release it first")
        if confirm is not None and not confirm(f"Delete every version of {cid}'s audio and metadata?"):
            raise DeskFailed("not confirmed; nothing deleted")
        refs: dict[str, list[ObjectRef]] = {}
        for key in (found.keys.audio, found.keys.metadata):
            refs[key] = [
                ObjectRef(o.key, o.version_id)
                async for o in self.store.list_prefix(key, versions=True)
                if o.key == key
            ]
        # On record before anything is deleted; refused if that cannot be written.
        started = await self.audit_first(
            "delete",
            reason=reason,
            target=target,
            details={
                "versions": [{"key": r.key, "version_id": r.version_id} for v in refs.values() for r in v]
            },
        )
        # Audio first, metadata only once the audio is gone: never audio left without metadata.
        first = await guard.delete(refs[found.keys.audio])
        second = await guard.delete(refs[found.keys.metadata]) if not first.refused else None
        refused = list(first.refused) + (list(second.refused) if second else [])
        deleted = len(first.deleted) + (len(second.deleted) if second else 0)
        await self.audit_outcome(
            started,
            "refused" if refused else "done",
            {
                "counts": {"objects_deleted": deleted, "objects_refused": len(refused)},
                "refused": [{"key": r.ref.key, "reason": r.reason} for r in refused],
            },
        )
        if refused:
            raise DeskRefused(
                f"refused: {refused[0].ref.key}: {refused[0].reason} ({deleted} object(s) deleted)"
            )
        return Deleted(cid, deleted)


@contextlib.asynccontextmanager
async def open_desk(
    cfg: Config,
    store: MinioStore,
    principal: Principal,
    *,
    warn: Callable[[str], None] | None = None,
    progress: Progress = no_progress,
) -> AsyncIterator[EvidenceDesk]:
    """One audit session: the desk with MQTT events for its audit records; the store is closed at the
    end. If the broker could not take the events, ``warn`` says so (the records in S3 are complete)."""
    try:
        async with CommandEvents(cfg.mqtt) as events:
            desk = EvidenceDesk(store, events, principal, warn=warn, progress=progress)
            yield desk
        if events.failure is not None:
            desk.warn(
                f"MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port}: events not published "
                f"({events.failure}); the audit record in S3 is complete"
            )
    finally:
        store.close()
