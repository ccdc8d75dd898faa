"""``kasuhara asterisk install|uninstall``: what an Asterisk needs for kasuhara-ari, as drop-in files.

An operator's own configuration is never rewritten. Everything of ours goes into ``kasuhara.d/`` next to
the main files (an ARI user, an AMI user with exactly the classes the app uses, the HTTP server ARI needs,
the dialplan contexts) and the prompts into the sounds directory; each main file gets one marked block at
its end that includes our drop-in (``#tryinclude``: Asterisk still starts if the drop-in is removed by
hand). Where the distribution already includes a directory (Debian's ``manager.conf`` includes
``manager.d/*.conf``), the drop-in goes there and the main file is not touched at all.

A plan is computed first (what each file is and will be), so ``--dry-run`` shows the exact diff and
changes nothing. ``kasuhara.d/install.json`` records what was written (sha256) and how each main file
ended before the block, so ``uninstall`` restores those files byte for byte and removes only files still
as written (one an operator edited since is kept, and said so).

Settings an operator already has are respected: an ARI or AMI user of the same name, or an HTTP server
enabled on another port than ``ari.url``'s, is a refusal with a message, not an override.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import Config, ari_listen_address

DROPIN = "kasuhara.d"
MANIFEST = f"{DROPIN}/install.json"
BEGIN = "; >>> kasuhara-ari: added by `kasuhara asterisk install`; `kasuhara asterisk uninstall` removes it"
END = "; <<< kasuhara-ari"
#: The prompts shipped in the package (a link to asterisk_conf/sounds in a checkout; copied into the wheel).
SOUNDS = Path(__file__).resolve().parent / "data" / "sounds"
#: Prompts of the test suite only (the 0.5 s test notice): never installed on a PBX.
TEST_ONLY_PREFIX = "test-"
#: AMI classes the app uses: MixMonitor/StopMixMonitor need ``system`` and ``call`` to write; the FastAGI
#: call-end watch reads ``Hangup`` (``call``); ``system`` events tell a restart. The agent's recovery pause
#: ([care]) writes ``agent`` (QueuePause), ``system`` (AstDB) and ``call`` (Setvar DEVICE_STATE, Getvar).
AMI_READ = "call,system"
AMI_WRITE = "system,call,agent"
_SECRET_LINE = re.compile(r"^(\s*(?:password|secret)\s*=\s*).*$", re.MULTILINE)


class SetupError(Exception):
    """Bad input (no such directory, unusable config): exit 2."""


class SetupRefused(Exception):
    """The operator's configuration conflicts with ours: exit 3, nothing written."""


@dataclass(frozen=True)
class Change:
    """One file: its bytes now (None: absent) and after (None: removed)."""

    path: Path
    before: bytes | None
    after: bytes | None
    mode: int = 0o640
    secret: bool = False
    #: Why a file that would differ is left alone (an operator's prompt or an edited drop-in).
    kept: str = ""

    @property
    def changes(self) -> bool:
        return self.before != self.after and not self.kept


@dataclass
class Plan:
    dest: Path
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, change: Change) -> None:
        self.changes.append(change)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def sections(text: str) -> dict[str, dict[str, str]]:
    """An Asterisk config file's sections and their last ``key = value`` (comments dropped); enough to see
    what an operator has set, not a full parser (templates and includes are not followed)."""
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        header = re.match(r"^\[([^\]]+)\]", line)
        if header:
            current = found.setdefault(header.group(1).strip(), {})
            continue
        if current is not None and "=" in line:
            key, _, value = line.partition("=")
            current[key.strip().lower()] = value.lstrip(">").strip()
    return found


def includes(text: str) -> list[str]:
    return [m.group(1).strip().strip('"') for m in re.finditer(r"^\s*#(?:try)?include\s+(.+)$", text, re.M)]


def _is_yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "y", "t", "1", "on")


def _header(name: str, present: Mapping[str, object]) -> str:
    """``[name](+)`` to add to a section the file already has, ``[name]`` otherwise (Asterisk refuses an
    addition to a section that does not exist)."""
    return f"[{name}](+)" if name in present else f"[{name}]"


def _dropin_text(title: str, body: str) -> bytes:
    return (
        f"; kasuhara-ari: {title}\n"
        "; Written by `kasuhara asterisk install` (removed by `kasuhara asterisk uninstall`); edit the\n"
        "; kasuhara config and re-run install rather than this file.\n\n" + body.strip() + "\n"
    ).encode()


def _ari_endpoint(cfg: Config) -> tuple[str, int]:
    url = urlsplit(cfg.ari.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SetupError(f"ari.url {cfg.ari.url!r} is not an http(s) URL")
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def _netmask_permit(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise SetupError(f"ami.host {host!r} must be an IP address for the AMI user's permit") from None
    full = "255.255.255.255" if address.version == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    return f"{address}/{full}"


def _check_name(kind: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise SetupError(f"{kind} {name!r}: letters, digits, '_', '.', '-' only")
    return name


def _check_secret(kind: str, value: str) -> str:
    if not value:
        raise SetupError(f"{kind} is empty: set it in the kasuhara config first")
    if any(ch in value for ch in ";\r\n") or value != value.strip():
        raise SetupError(
            f"{kind} must not contain ';', line breaks or surrounding spaces (Asterisk's syntax)"
        )
    return value


class Installer:
    """Plans install and uninstall against ``dest`` (an Asterisk config directory)."""

    def __init__(
        self, cfg: Config, dest: Path, sounds_dir: Path | None = None, source: Path = SOUNDS
    ) -> None:
        if not dest.is_dir():
            raise SetupError(f"{dest} is not a directory (the Asterisk config directory, e.g. /etc/asterisk)")
        self.cfg = cfg
        self.dest = dest
        self.sounds_dir = sounds_dir if sounds_dir is not None else self._default_sounds()
        self.source = source

    def _default_sounds(self) -> Path:
        text = (read(self.dest / "asterisk.conf") or b"").decode("utf-8", "replace")
        for category in ("directories", "directories(!)"):
            data = sections(text).get(category, {}).get("astdatadir")
            if data:
                return Path(data) / "sounds"
        return Path("/usr/share/asterisk/sounds")

    # -------------------------------------------------------------------------------------------- install

    def plan_install(self) -> Plan:
        plan = Plan(self.dest)
        manifest_files: dict[str, str] = {}
        blocks: dict[str, Any] = {}

        def dropin(name: str, content: bytes, *, secret: bool = False) -> None:
            path = self.dest / DROPIN / name
            before = read(path)
            kept = ""
            recorded = self._manifest().get("files", {}).get(str(path))
            if before is not None and before != content and recorded != sha256(before):
                kept = "exists and was not written by install (or was edited since): left as it is"
            plan.add(Change(path, before, content, 0o640, secret, kept))
            if not kept:  # an operator's file is never recorded: uninstall must not remove it
                manifest_files[str(path)] = sha256(content)

        def include_block(main: str, target: str) -> None:
            path = self.dest / main
            before = read(path)
            text = (before or b"").decode("utf-8", "replace")
            if BEGIN in text:
                blocks[main] = self._manifest().get("blocks", {}).get(main, {"created": before is None})
                plan.add(Change(path, before, before))
                return
            newline = bool(text) and not text.endswith("\n")
            block = f"{BEGIN}\n#tryinclude {DROPIN}/{target}\n{END}\n"
            after = (text + ("\n" if newline else "") + ("\n" if text else "") + block).encode()
            blocks[main] = {"created": before is None, "added_newline": newline}
            plan.add(Change(path, before, after, _mode_of(path, 0o640)))

        dropin("ari.conf", self._ari_conf())
        include_block("ari.conf", "ari.conf")
        if self.cfg.ari.mode == "listen":  # Asterisk connects to the app: no HTTP server needed for ARI
            dropin("websocket_client.conf", self._websocket_client_conf(), secret=True)
            include_block("websocket_client.conf", "websocket_client.conf")
        http = self._http_conf() if self.cfg.ari.mode == "connect" else None
        if http is not None:
            dropin("http.conf", http)
            include_block("http.conf", "http.conf")
        manager, where = self._manager_conf()
        if where == "manager.d":
            path = self.dest / "manager.d" / "kasuhara.conf"
            before = read(path)
            recorded = self._manifest().get("files", {}).get(str(path))
            kept = ""
            if before is not None and before != manager and recorded != sha256(before):
                kept = "exists and was not written by install (or was edited since): left as it is"
            plan.add(Change(path, before, manager, 0o640, True, kept))
            if not kept:
                manifest_files[str(path)] = sha256(manager)
        else:
            dropin("manager.conf", manager, secret=True)
            include_block("manager.conf", "manager.conf")
        dropin("extensions.conf", self._extensions_conf())
        include_block("extensions.conf", "extensions.conf")
        self._plan_sounds(plan, manifest_files)

        manifest = {"schema": "kasuhara-asterisk-install-1", "files": manifest_files, "blocks": blocks}
        path = self.dest / MANIFEST
        plan.add(Change(path, read(path), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()))
        return plan

    def _manifest(self) -> dict[str, Any]:
        raw = read(self.dest / MANIFEST)
        if raw is None:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise SetupError(f"{self.dest / MANIFEST} is not JSON: fix or remove it") from None
        return data if isinstance(data, dict) else {}

    def _existing(self, main: str) -> dict[str, dict[str, str]]:
        """The sections of a main file without our own block (what the operator has)."""
        text = (read(self.dest / main) or b"").decode("utf-8", "replace")
        return sections(_without_block(text)[0])

    def _ari_conf(self) -> bytes:
        ari = self.cfg.ari
        user = _check_name("ari.username", ari.username)
        password = _check_secret("ari.password", ari.password)
        have = self._existing("ari.conf")
        if user in have:
            raise SetupRefused(
                f"ari.conf already has a section [{user}]: remove it, or set ari.username to another name"
            )
        general = (
            ""
            if _is_yes(have.get("general", {}).get("enabled"))
            else (f"{_header('general', have)}\nenabled = yes\n\n")
        )
        outbound = ""
        if self.cfg.ari.mode == "listen":
            app = _check_name("ari.app", self.cfg.ari.app)
            if f"{user}-outbound" in have:
                raise SetupRefused(f"ari.conf already has a section [{user}-outbound]: remove it")
            # Asterisk connects to `kasuhara serve` (ari.mode = listen) and serves the app there, with the
            # rights of the ARI user above.
            outbound = (
                f"\n[{user}-outbound]\ntype = outbound_websocket\nwebsocket_client_id = {user}\n"
                f"apps = {app}\nlocal_ari_user = {user}\nsubscribe_all = no\n"
            )
        return _dropin_text(
            "the ARI user of `kasuhara serve`",
            f"{general}[{user}]\ntype = user\nread_only = no\n"
            f"password = {password}\npassword_format = plain\n{outbound}",
        )

    def _websocket_client_conf(self) -> bytes:
        """``ari.mode = listen``: the connection Asterisk keeps open to ``kasuhara serve`` (persistent,
        reconnecting), with the ARI user's credentials, which ``serve`` checks."""
        ari = self.cfg.ari
        user = _check_name("ari.username", ari.username)
        password = _check_secret("ari.password", ari.password)
        host, port = ari_listen_address(ari)
        if user in self._existing("websocket_client.conf"):
            raise SetupRefused(f"websocket_client.conf already has a section [{user}]: remove it")
        where = f"[{host}]" if ":" in host else host
        return _dropin_text(
            "the connection Asterisk keeps to `kasuhara serve` (ari.mode = listen)",
            f"[{user}]\ntype = websocket_client\nuri = ws://{where}:{port}/ari\nprotocols = ari\n"
            f"username = {user}\npassword = {password}\nconnection_type = persistent\n"
            "connection_timeout = 1000\nreconnect_interval = 1000\ntls_enabled = no\n",
        )

    def _http_conf(self) -> bytes | None:
        """The HTTP server ARI runs on, unless the operator's already serves ``ari.url``'s port."""
        host, port = _ari_endpoint(self.cfg)
        have = self._existing("http.conf").get("general", {})
        if _is_yes(have.get("enabled")):
            theirs = int(have.get("bindport", "8088") or 8088)
            if theirs != port:
                raise SetupRefused(
                    f"http.conf already serves HTTP on port {theirs}, and ari.url ({self.cfg.ari.url}) says "
                    f"{port}: change ari.url (or their bindport)"
                )
            return None
        bind = host if host not in ("localhost",) else "127.0.0.1"
        present = self._existing("http.conf")
        return _dropin_text(
            "the HTTP server that carries ARI (ari.url)",
            f"{_header('general', present)}\nenabled = yes\nbindaddr = {bind}\nbindport = {port}\n",
        )

    def _manager_conf(self) -> tuple[bytes, str]:
        ami = self.cfg.ami
        user = _check_name("ami.username", ami.username)
        secret = _check_secret("ami.secret", ami.secret)
        main = (read(self.dest / "manager.conf") or b"").decode("utf-8", "replace")
        have = sections(_without_block(main)[0])
        d = self.dest / "manager.d"
        for extra in sorted(d.glob("*.conf")) if d.is_dir() else []:
            if extra.name != "kasuhara.conf":
                have.update(sections(extra.read_text(errors="replace")))
        if user in have:
            raise SetupRefused(
                f"manager.conf already has a user [{user}]: remove it, or set ami.username to another name"
            )
        general = have.get("general", {})
        lines = []
        if not _is_yes(general.get("enabled")):
            lines.append(
                f"{_header('general', have)}\nenabled = yes\nport = {ami.port}\nbindaddr = {ami.host}\n"
            )
        elif int(general.get("port", "5038") or 5038) != ami.port:
            raise SetupRefused(
                f"manager.conf listens on port {general.get('port')}, and ami.port is {ami.port}: change one"
            )
        lines.append(
            f"[{user}]\nsecret = {secret}\ndeny = 0.0.0.0/0.0.0.0\npermit = {_netmask_permit(ami.host)}\n"
            f"read = {AMI_READ}\nwrite = {AMI_WRITE}\n"
        )
        text = _dropin_text("the AMI user of kasuhara-ari (MixMonitor, call events)", "\n".join(lines))
        uses_dir = any(inc.startswith("manager.d/") for inc in includes(main))
        return text, ("manager.d" if uses_dir and d.is_dir() else DROPIN)

    def _extensions_conf(self) -> bytes:
        app = _check_name("ari.app", self.cfg.ari.app)
        spool = self.cfg.recording.asterisk_dir.rstrip("/")
        target = self.cfg.routing.default_target
        if not re.fullmatch(r"[A-Za-z0-9_/@:.+-]{1,200}", target):
            raise SetupError(f"routing.default_target {target!r} cannot go into the dialplan as it is")
        # ari.mode = listen: Asterisk's persistent outbound websocket keeps the app registered while
        # `serve` is away, and Stasis() then queues the call instead of failing (verified on 22.10): ask the
        # app whether it is alive first (func_curl, 1 s), so the fallback still takes the call.
        alive = ""
        if self.cfg.ari.mode == "listen":
            host, port = ari_listen_address(self.cfg.ari)
            where = f"[{host}]" if ":" in host else host
            alive = (
                " same => n,Set(CURLOPT(conntimeout)=1)\n same => n,Set(CURLOPT(httptimeout)=2)\n"
                f' same => n,GotoIf($["${{CURL(http://{where}:{port}/healthz)}}" != "ok"]?fallback,1)\n'
            )
        body = f"""
; Inbound: from your own context, Set(KASUHARA_TARGET=PJSIP/agents) (optional: routing.default_target)
; and Goto(kasuhara-inbound,${{EXTEN}},1). Outbound: Set(KASUHARA_TARGET=PJSIP/${{EXTEN}}@trunk) and
; Goto(kasuhara-outbound,${{EXTEN}},1).
; If the app is not running (STASISSTATUS=FAILED) the call still gets the notice and is recorded into
; the spool as <linkedid>.wav, then dialled (KASUHARA_TARGET, else routing.default_target): once the app
; runs again its uploader adopts the recording as an orphan (storage.orphan_after_s) and stores it.
; Care: a direct target whose agent is in a recovery pause (device state Custom:kasuhara-care-<endpoint>
; is BUSY) is replaced by KASUHARA_COOLDOWN_TARGET when you set one (e.g. a queue or a colleague).
[kasuhara-inbound]
exten => _[+0-9A-Za-z*#].,1,Set(KASUHARA_AGENT=${{CUT(KASUHARA_TARGET,@,1)}})
 same => n,Set(KASUHARA_AGENT=${{CUT(KASUHARA_AGENT,/,2)}})
 same => n,GotoIf($[${{LEN(${{KASUHARA_COOLDOWN_TARGET}})}} = 0 \
| ${{DEVICE_STATE(Custom:kasuhara-care-${{KASUHARA_AGENT}})}} != BUSY]?app)
 same => n,Set(KASUHARA_TARGET=${{KASUHARA_COOLDOWN_TARGET}})
 same => n(app),NoOp(kasuhara-ari)
{alive} same => n,Stasis({app},inbound,${{KASUHARA_TARGET}})
 same => n,GotoIf($["${{STASISSTATUS}}" = "FAILED"]?fallback,1)
 same => n,Hangup()
exten => fallback,1,Answer()
 same => n,MixMonitor({spool}/${{CHANNEL(linkedid)}}.wav)
 same => n,Set(CHANNEL(language)={self.cfg.announcement.language})
 same => n,Playback({self.cfg.announcement.sound})
 ; Not IF(): its true:false split would cut a target at its first colon (PJSIP/x/sip:a@b:5060).
 same => n,GotoIf($[${{LEN(${{KASUHARA_TARGET}})}} > 0]?dial)
 same => n,Set(KASUHARA_TARGET={target})
 same => n(dial),Dial(${{KASUHARA_TARGET}})
 same => n,Hangup()

[kasuhara-outbound]
exten => _[+0-9A-Za-z*#].,1,NoOp(kasuhara-ari)
{alive} same => n,Stasis({app},outbound,${{KASUHARA_TARGET}})
 same => n,GotoIf($["${{STASISSTATUS}}" = "FAILED"]?fallback,1)
 same => n,Hangup()
exten => fallback,1,MixMonitor({spool}/${{CHANNEL(linkedid)}}.wav)
 same => n,Dial(${{KASUHARA_TARGET}})
 same => n,Hangup()

; Care: the agent dials *0 to end their own recovery pause early (one beep: ended; two: there was none).
; Add `include => kasuhara-care` to your agents' context.
[kasuhara-care]
exten => *0,1,Stasis({app},care-resume)
 same => n,Answer()
 same => n,Playback(beep)
 same => n,GotoIf($["${{KASUHARA_CARE_RESUMED}}" = "1"]?done)
 same => n,Playback(beep)
 same => n(done),Hangup()
"""
        return _dropin_text("the dialplan entries", body)

    def _plan_sounds(self, plan: Plan, manifest_files: dict[str, str]) -> None:
        recorded = self._manifest().get("files", {})
        if not self.source.is_dir():
            plan.notes.append(f"no prompts in this install ({self.source}): copy them by hand")
            return
        for wav in sorted(self.source.glob("*/kasuhara/*.wav")):
            if wav.name.startswith(TEST_ONLY_PREFIX):
                continue
            lang = wav.parent.parent.name
            target = self.sounds_dir / lang / "kasuhara" / wav.name
            content = wav.read_bytes()
            before = read(target)
            kept = ""
            if before is not None and before != content and recorded.get(str(target)) != sha256(before):
                kept = "a prompt of yours (e.g. a studio recording): kept"
            plan.add(Change(target, before, content, 0o644, False, kept))
            if not kept:
                manifest_files[str(target)] = sha256(content)

    # ------------------------------------------------------------------------------------------ uninstall

    def plan_uninstall(self) -> Plan:
        plan = Plan(self.dest)
        manifest = self._manifest()
        if not manifest:
            plan.notes.append(f"nothing to uninstall: no {self.dest / MANIFEST}")
            return plan
        files = manifest.get("files", {})
        for name, digest in sorted(files.items()):
            path = Path(name)
            before = read(path)
            if before is None:
                continue
            if sha256(before) != digest:
                plan.add(Change(path, before, None, kept="changed since install: kept"))
            else:
                plan.add(Change(path, before, None))
        for main, info in sorted(manifest.get("blocks", {}).items()):
            path = self.dest / main
            before = read(path)
            if before is None:
                continue
            text, found = _without_block(before.decode("utf-8", "replace"))
            if not found:
                plan.notes.append(f"{path}: our block is not there any more")
                continue
            if isinstance(info, dict) and info.get("added_newline") and text.endswith("\n"):
                text = text[:-1]
            created = isinstance(info, dict) and info.get("created")
            plan.add(
                Change(path, before, None if created and not text else text.encode(), _mode_of(path, 0o640))
            )
        plan.add(Change(self.dest / MANIFEST, read(self.dest / MANIFEST), None))
        return plan


def _without_block(text: str) -> tuple[str, bool]:
    """``text`` without our marked block (and the blank line install put before it)."""
    start = text.find(BEGIN)
    if start < 0:
        return text, False
    end = text.find(END, start)
    if end < 0:
        return text, False
    end += len(END)
    if text[end : end + 1] == "\n":
        end += 1
    head = text[:start]
    if head.endswith("\n\n"):
        head = head[:-1]
    elif head == "\n":
        head = ""
    return head + text[end:], True


def _mode_of(path: Path, default: int) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return default


def apply(plan: Plan) -> list[str]:
    """Write the plan: each file atomically (a temporary file renamed over it), new directories made,
    owner and group copied from the config directory (Asterisk must read them); empty ``kasuhara.d/``
    removed. Returns what was done, one line per file."""
    done = []
    st = plan.dest.stat()
    for change in plan.changes:
        if not change.changes:
            continue
        path = change.path
        if change.after is None:
            path.unlink(missing_ok=True)
            done.append(f"removed  {path}")
            if path.suffix == ".wav":  # <sounds>/<lang>/kasuhara/: the folders install made, if now empty
                for folder in (path.parent, path.parent.parent):
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            continue
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            if os.geteuid() == 0 and path.parent.is_relative_to(plan.dest):
                os.chown(path.parent, st.st_uid, st.st_gid)
        tmp = path.with_name(f".{path.name}.kasuhara-tmp")
        tmp.write_bytes(change.after)
        os.chmod(tmp, change.mode)
        if os.geteuid() == 0 and path.is_relative_to(plan.dest):
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
        done.append(f"{'wrote   ' if change.before is None else 'updated '} {path}")
    for folder in (plan.dest / DROPIN,):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return done


def diff(plan: Plan) -> str:
    """A unified diff of the text files of the plan (passwords and secrets shown as ``********``); binary
    files (prompts) as one line each."""
    import difflib

    out: list[str] = []
    for change in plan.changes:
        if change.kept:
            out.append(f"# kept {change.path}: {change.kept}\n")
            continue
        if not change.changes:
            continue
        if change.path.suffix == ".wav":
            verb = "new" if change.before is None else ("remove" if change.after is None else "replace")
            out.append(f"# {verb} prompt {change.path}\n")
            continue
        a = _shown(change.before)
        b = _shown(change.after)
        out.extend(
            _ended(line)
            for line in difflib.unified_diff(
                a.splitlines(keepends=True),
                b.splitlines(keepends=True),
                fromfile=str(change.path) if change.before is not None else "/dev/null",
                tofile=str(change.path) if change.after is not None else "/dev/null",
            )
        )
    return "".join(out)


def _ended(line: str) -> str:
    return line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"


def _shown(data: bytes | None) -> str:
    if data is None:
        return ""
    return _SECRET_LINE.sub(r"\1********", data.decode("utf-8", "replace"))


def summary(plan: Plan) -> Iterable[str]:
    for change in plan.changes:
        if change.kept:
            yield f"kept     {change.path} ({change.kept})"
        elif change.changes:
            verb = "add" if change.before is None else ("remove" if change.after is None else "change")
            yield f"{verb:<8} {change.path}"
