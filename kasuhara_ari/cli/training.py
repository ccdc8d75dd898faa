"""``kasuhara training``: cut training clips out of harassment calls, list, play and export them.

A face of :mod:`kasuhara_ari.training.library`: options, printing and exit codes here; role checks,
audit records and the objects there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import click

from ..safe import clean_caller_text
from ..training.clipper import parse_offset
from ..training.library import Clip, TrainingLibrary, clip_id_of
from .admin import finish, open_store, run_async, session, text, timezone_of
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, config_option, load_config
from .recordings import call_id_arg, check_output, date_option, day_option, reason_option


@click.group()
def training() -> None:
    """The training library: clips of held or flagged calls, without the caller's identity.

    \b
    Clips live under training/ in the bucket (retention never deletes them; deleting the source call
    leaves them whole); which call a clip came from is only in training-sources/, which only the admin
    S3 key may read. Every command needs the [admin] keys (supervisor/admin roles) and writes an audit
    record. Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 refused (role; a call that is
    neither held nor flagged).
    """


def _offset(value: str, option: str) -> float:
    try:
        return parse_offset(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _clip_id(value: str) -> str:
    try:
        return clip_id_of(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'CLIP_ID'") from None


def _describe(clip: Clip) -> str:
    anon = " anonymised" if clip.anonymised else ""
    return (
        f"{clip.clip_id}  {clip.duration_s:7.2f}s  {clip.channels}ch{anon}  "
        f"{text(clip.created_at, 29)}  {text(clip.created_by, 24)}  {text(clip.title, 80)}"
    )


@training.command("add")
@config_option
@click.argument("call_id")
@click.option("--from", "start", required=True, metavar="TIME", help="Start in the recording (MM:SS).")
@click.option("--to", "end", required=True, metavar="TIME", help="End in the recording (MM:SS).")
@click.option("--title", required=True, help="The clip's title (never the caller's name or number).")
@click.option("--note", default="", help="What trainees should notice.")
@click.option("--anonymise", is_flag=True, help="Shift the caller's voice (needs a stereo recording).")
@date_option
@reason_option(required=False)
def add(
    config_path: str | None,
    call_id: str,
    start: str,
    end: str,
    title: str,
    note: str,
    anonymise: bool,
    on_date: str | None,
    reason: str,
) -> None:
    """Cut --from..--to out of CALL_ID (held or flagged) into a new training clip; prints its id."""
    cfg = load_config(config_path)
    cid = call_id_arg(call_id)
    start_s, end_s = _offset(start, "--from"), _offset(end, "--to")
    if end_s <= start_s:
        raise click.BadParameter("must be after --from", param_hint="'--to'")
    days = day_option(on_date, timezone_of(cfg))
    store = open_store(cfg, role="admin", command="training add", action="training_add")

    async def go() -> Clip | str:
        async with session(cfg, store) as desk:
            library = TrainingLibrary(desk, pitch_cents=cfg.training.pitch_cents)
            try:
                return await library.add(
                    cid,
                    start_s,
                    end_s,
                    title=title,
                    note=note,
                    anonymise=anonymise,
                    days=days,
                    reason=reason,
                )
            except ValueError as exc:
                return str(exc)

    got = run_async(cfg, go)
    if isinstance(got, str):
        finish(EXIT_CONFIG, got)
    click.echo(_describe(got))


@training.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line per clip.")
@reason_option(required=False)
def list_clips(config_path: str | None, as_json: bool, reason: str) -> None:
    """Every training clip, oldest first."""
    cfg = load_config(config_path)
    store = open_store(cfg, role="admin", command="training list", action="training_list")

    async def go() -> tuple[list[Clip], list[str]]:
        async with session(cfg, store) as desk:
            clips, problems = await TrainingLibrary(desk).clips(reason=reason)
            return clips, [f"{p.key}: {p.problem}" for p in problems]

    clips, problems = run_async(cfg, go)
    for clip in clips:
        if as_json:
            doc = clip.as_dict()
            doc["title"] = clean_caller_text(doc["title"], max_chars=200)
            doc["note"] = clean_caller_text(doc["note"], max_chars=4000)
            click.echo(json.dumps(doc, ensure_ascii=False))
        else:
            click.echo(_describe(clip))
    for line in problems:
        click.echo(f"warning: not a clip: {text(line, 300)}", err=True)
    raise SystemExit(EXIT_OK)


@training.command("play")
@config_option
@click.argument("clip_id")
@click.option("-o", "--output", "output", metavar="FILE", help="Write the WAV here instead of playing it.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@reason_option(required=False)
def play(config_path: str | None, clip_id: str, output: str | None, force: bool, reason: str) -> None:
    """Play a clip (sox's `play`), or write it to FILE; verified against its sha256 either way."""
    cfg = load_config(config_path)
    cid = _clip_id(clip_id)
    out = check_output(output, force) if output else None
    player = shutil.which("play")
    if out is None and player is None:
        finish(EXIT_CONFIG, "no `play` (Debian package sox) to play with: give -o FILE")
    store = open_store(cfg, role="admin", command="training play", action="training_play")
    with tempfile.TemporaryDirectory(prefix="kasuhara-play-") as tmp:
        target = out or Path(tmp) / f"{cid}.wav"

        async def go() -> Clip:
            async with session(cfg, store) as desk:
                return await TrainingLibrary(desk).play(cid, target, reason=reason)

        clip = run_async(cfg, go)
        click.echo(_describe(clip), err=out is None)
        if out is None:
            assert player is not None
            code = subprocess.call([player, "-q", str(target)])  # our own temp file, no shell
            raise SystemExit(EXIT_OK if code == 0 else EXIT_FAILED)
    raise SystemExit(EXIT_OK)


@training.command("export")
@config_option
@click.argument("clip_ids", nargs=-1, required=True, metavar="CLIP_ID...")
@click.option("-o", "--output", "output", required=True, metavar="FILE", help="The zip to write.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@reason_option(required=False)
def export(config_path: str | None, clip_ids: tuple[str, ...], output: str, force: bool, reason: str) -> None:
    """A zip of clips for a training session: WAV + metadata each, SHA256SUMS, manifest.json."""
    cfg = load_config(config_path)
    ids = [_clip_id(c) for c in clip_ids]
    out = check_output(output, force)
    store = open_store(cfg, role="admin", command="training export", action="training_export")

    async def go() -> list[Clip]:
        async with session(cfg, store) as desk:
            return await TrainingLibrary(desk).export(ids, out, reason=reason)

    clips = run_async(cfg, go)
    click.echo(f"{out}  {len(clips)} clip(s)")
    raise SystemExit(EXIT_OK)
