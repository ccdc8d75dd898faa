"""``kasuhara doctor``: checks every dependency and says exactly what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import errno
import os
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .ami import AmiClient, AmiError
from .ari import AriClient, AriError, ChannelGone
from .config import Config, StorageConfig, ari_listen_address, console_keys, web_bind_refusal
from .events import mqtt_tls_context
from .safe import printable


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    #: Works, but needs a look (shown as ``warn``; the exit code stays 0).
    warn: bool = False


async def _check_ari_listen(cfg: Config) -> Check:
    """``ari.mode = listen``: Asterisk connects to ``serve``, so only ``serve`` can speak ARI; what the
    doctor can tell is whether something listens there (``serve`` running) or the port is free for it."""
    host, port = ari_listen_address(cfg.ari)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    except (OSError, TimeoutError):
        return Check(
            "ari",
            True,
            f"listen mode: nothing listens on {host}:{port} yet (kasuhara serve listens there, and "
            "Asterisk's outbound websocket connects to it)",
            warn=True,
        )
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Check("ari", True, f"listen mode: {host}:{port} listens (Asterisk's outbound websocket connects)")


#: Asterisk modules the app needs beyond ARI itself, and the setting that needs them.
NEEDED_MODULES = {
    "app_mixmonitor.so": None,
    "chan_bridge_media.so": None,  # prompts played into a bridge (warnings, time limit) go through it
    "res_stasis_snoop.so": None,  # kasuhara supervise (listen, whisper)
    "func_talkdetect.so": "detection.mode",  # live detection (TALK_DETECT)
    "chan_rtp.so": "detection.loudness",  # the caller's audio to the app (ARI externalMedia = UnicastRTP)
}


async def check_ari(cfg: Config) -> Check:
    if cfg.ari.mode == "listen":
        return await _check_ari_listen(cfg)
    async with AriClient(cfg.ari.url, cfg.ari.username, cfg.ari.password, cfg.ari.app, timeout=3) as ari:
        try:
            info = await ari.info()
        except AriError as exc:
            return Check("ari", False, f"{cfg.ari.url}: {exc}")
        missing = []
        for module, setting in NEEDED_MODULES.items():
            if setting == "detection.mode" and cfg.detection.mode == "off":
                continue
            if setting == "detection.loudness" and (
                cfg.detection.mode == "off" or not cfg.detection.loudness
            ):
                continue
            try:
                state = await ari.request("GET", f"/asterisk/modules/{module}")
            except AriError:
                state = None
            if not isinstance(state, dict) or state.get("status") != "Running":
                missing.append(module + (f" (for {setting})" if setting else ""))
    version = (info.get("system") or {}).get("version", "?")
    if missing:
        return Check(
            "ari", False, f"{cfg.ari.url} Asterisk {version}: modules not loaded: {', '.join(missing)}"
        )
    systemname = str((info.get("config") or {}).get("name") or "")
    if systemname and cfg.general.node and systemname != cfg.general.node:
        # The call ids would name one node and the metadata and events another.
        return Check(
            "ari",
            False,
            f"{cfg.ari.url} Asterisk {version}: systemname {printable(systemname, max_chars=40)} but "
            f"general.node {cfg.general.node}: set both to the node's name",
        )
    node = (
        f"systemname {printable(systemname, max_chars=40)}"
        if systemname
        else "no systemname (call ids are not unique across nodes)"
    )
    return Check("ari", True, f"{cfg.ari.url} Asterisk {version}, modules loaded, {node}")


async def check_ami(cfg: Config) -> Check:
    ami = AmiClient(cfg.ami.host, cfg.ami.port, cfg.ami.username, cfg.ami.secret, action_timeout_s=3)
    try:
        await ami.wait_ready(timeout=5)
        # A MixMonitor on a channel that cannot exist: "Permission denied" tells us the user lacks the
        # `system` write class that MixMonitor needs; any other error means the permission is there.
        probe = f"kasuhara-doctor-{uuid.uuid4().hex[:8]}"
        try:
            await ami.mixmonitor(probe, "/dev/null")
        except AmiError as exc:
            if "permission" in str(exc).lower():
                return Check(
                    "ami",
                    False,
                    f"{ami.address}: user {cfg.ami.username!r} may not run MixMonitor "
                    "(manager.conf needs write=system,call)",
                )
        allowed = "MixMonitor"
        if cfg.care.cooldown:
            # The recovery pause: QueuePause needs the `agent` write class (an unknown interface is
            # refused for that, not for the permission).
            try:
                await ami.action({"Action": "QueuePause", "Interface": probe, "Paused": "false"})
            except AmiError as exc:
                if "permission" in str(exc).lower():
                    return Check(
                        "ami",
                        False,
                        f"{ami.address}: user {cfg.ami.username!r} may not run QueuePause for care.cooldown "
                        "(manager.conf needs write=system,call,agent)",
                    )
            allowed += ", QueuePause"
        return Check("ami", True, f"{ami.address} logged in; {allowed} allowed")
    except AmiError as exc:
        return Check("ami", False, str(exc))
    finally:
        ami.close()


async def check_mqtt(cfg: Config) -> Check:
    if not cfg.mqtt.enabled:
        return Check("mqtt", True, "disabled (mqtt.enabled = false)")
    import aiomqtt

    from . import mqtt_client

    try:
        async with mqtt_client.Client(
            cfg.mqtt.host,
            cfg.mqtt.port,
            username=cfg.mqtt.username or None,
            password=cfg.mqtt.password or None,
            tls_context=mqtt_tls_context(cfg.mqtt),
            timeout=3,
        ) as client:
            await client.publish(f"{cfg.mqtt.topic_prefix}/doctor", b"{}", qos=1)
    except (aiomqtt.MqttError, OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("mqtt", False, f"{cfg.mqtt.host}:{cfg.mqtt.port}: {exc}")
    tls = " over TLS" if cfg.mqtt.tls else " (no TLS: mqtt.tls = false)"
    return Check("mqtt", True, f"{cfg.mqtt.host}:{cfg.mqtt.port} publish ok{tls}")


def _doctor_client(st: StorageConfig) -> Any:
    """A minio client for one look: short timeouts, no retries (a doctor reports, it does not insist)."""
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=3, read=5), retries=urllib3.Retry(total=0))
    return Minio(
        st.endpoint,
        access_key=st.access_key,
        secret_key=st.secret_key,
        secure=st.secure,
        region=st.region,
        http_client=http,
    )


def _check_s3_sync(cfg: Config) -> Check:
    from minio.error import S3Error

    st = cfg.storage
    if not st.enabled:
        return Check("s3", True, "disabled (storage.enabled = false)")
    client = _doctor_client(st)
    try:
        if not client.bucket_exists(st.bucket):
            return Check(
                "s3", False, f"{st.endpoint}: bucket {st.bucket!r} does not exist (kasuhara storage init)"
            )
        try:
            lock = client.get_object_lock_config(st.bucket)
        except S3Error:
            lock = None
        if lock is None:
            return Check("s3", False, f"bucket {st.bucket!r} has no object lock: evidence holds cannot work")
    except S3Error as exc:
        return Check("s3", False, f"{st.endpoint}: {exc.code}")
    except Exception as exc:
        return Check("s3", False, f"{st.endpoint}: {type(exc).__name__}")
    return Check("s3", True, f"{st.endpoint} bucket {st.bucket!r} with object lock")


#: What the probe writes: an empty file is created even on a full disk; data is what needs room.
_PROBE_BYTES = 64 * 1024


def _disk_detail(path: Path, write_error: str = "") -> tuple[bool, str]:
    from .uploader import disk_state

    state = disk_state(path, write_error=write_error)
    free = "?" if state.free_bytes is None else f"{state.free_bytes / 2**20:.0f} MiB free"
    if state.state == "full":
        why = f"{free}; {state.error}" if state.error else free
        return False, f"disk FULL ({why}): hold requests and metadata wait in serve's memory"
    if state.state == "low":
        return True, f"disk low ({free})"
    return True, free


def check_spool(cfg: Config) -> Check:
    """The spool (and the hold queue) exist, are writable *with data* (a full disk accepts an empty
    file), and how much room is left: a full spool delays holds and metadata (``serve`` keeps them in
    memory and retries; the MQTT status says ``spool_disk``)."""
    path = Path(cfg.recording.host_dir)
    if not path.is_dir():
        return Check("spool", False, f"{path} does not exist (recording.local_dir / asterisk_dir)")
    if not os.access(path, os.R_OK):
        return Check("spool", False, f"{path}: not readable")
    details = []
    ok = True
    dirs = [path] + ([Path(cfg.storage.queue_dir)] if cfg.storage.queue_dir else [])
    for where in dirs:
        write_error = ""
        try:
            with tempfile.NamedTemporaryFile(dir=where, prefix=".doctor-") as fh:
                fh.write(b"\0" * _PROBE_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
        except FileNotFoundError:
            return Check("spool", False, f"{where} does not exist (storage.queue_dir)")
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return Check("spool", False, f"{where}: not writable ({exc.strerror})")
            write_error = exc.strerror or "no space"
        fine, detail = _disk_detail(where, write_error)
        ok = ok and fine
        details.append(f"{where}: {detail}")
    low = any("disk low" in d for d in details)
    return Check("spool", ok, "; ".join(details), warn=ok and low)


async def check_web(cfg: Config) -> Check:
    """The console (``kasuhara web``): would it start on its address, can it read its accounts with its
    keys, is there an admin, and is one answering there now. No accounts yet is not a failure (a site
    may not use the console); unreadable accounts or a refused bind are."""
    import httpx

    from .accounts import Accounts, Role
    from .storage import MinioStore, StorageError, StorageSetupError

    web = cfg.web
    url = f"http://{web.bind if ':' not in web.bind else f'[{web.bind}]'}:{web.port}/"
    refusal = web_bind_refusal(web)
    if refusal is not None:
        return Check("web", False, refusal)
    if not cfg.storage.enabled:
        return Check("web", True, f"{url}: storage disabled, so no console accounts")
    access, secret = console_keys(cfg)
    try:
        store = MinioStore.from_config(
            cfg.storage,
            access_key=access,
            secret_key=secret,
            connect_timeout_s=3.0,
            read_timeout_s=5.0,
            connect_retries=0,
        )
    except StorageSetupError as exc:
        return Check("web", False, str(exc))
    try:
        users = await Accounts(store).list()
    except StorageError as exc:  # our own messages: no URL, no signature
        return Check("web", False, f"console accounts (users/accounts.json) unreadable: {exc}")
    except Exception as exc:
        return Check("web", False, f"console accounts (users/accounts.json) unreadable: {type(exc).__name__}")
    finally:
        store.close()
    enabled = [u for u in users if not u.disabled]
    admins = sum(1 for u in enabled if u.role == Role.ADMIN)
    running = False
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient(timeout=2) as http:
            running = (await http.get(url + "healthz")).text == "ok"
    state = "console answering" if running else "console not running"
    if not enabled:
        return Check(
            "web", True, f"{url} {state}; no console accounts yet (kasuhara users add NAME --role admin)"
        )
    return Check("web", True, f"{url} {state}; {len(enabled)} enabled account(s), {admins} admin")


#: Clock skew against S3 (seconds). Warn: beyond what the Date header's one-second resolution and the
#: round trip explain, so the clock really is off (NTP not keeping it). Fail: evidence times (events,
#: metadata, audit records, holds) come from this clock and are set beside S3's own times and the PBX's
#: and phones' logs; half a minute off, a call's times no longer line up (SigV4's hard 15-minute limit,
#: RequestTimeTooSkewed, comes much later).
CLOCK_WARN_S = 2.0
CLOCK_FAIL_S = 30.0


async def check_clock(cfg: Config, *, now: Callable[[], float] = time.time) -> Check:
    """This host's clock against the ``Date`` header of a real answer from the S3 server (any answer,
    even a refusal, carries one). ``now`` is the local clock (a test shifts it)."""
    import httpx

    st = cfg.storage
    if not st.enabled:
        return Check("clock", True, "storage disabled: no S3 clock to compare with")
    url = f"{'https' if st.secure else 'http'}://{st.endpoint}/"
    try:
        async with httpx.AsyncClient(timeout=3) as http:
            before = now()
            resp = await http.head(url)
            after = now()
    except httpx.HTTPError as exc:
        return Check("clock", False, f"{st.endpoint}: no answer to compare clocks ({type(exc).__name__})")
    date = resp.headers.get("date")
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        server = None
    if server is None:
        return Check("clock", False, f"{st.endpoint}: the answer has no usable Date header")
    # The header is truncated to the second: compare with the middle of the round trip, half a second on.
    skew = server + 0.5 - (before + after) / 2
    shown = f"{abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} S3 ({st.endpoint})"
    if abs(skew) > CLOCK_FAIL_S:
        return Check("clock", False, f"this host's clock is {shown}: fix NTP (evidence times come from it)")
    if abs(skew) > CLOCK_WARN_S:
        return Check("clock", True, f"this host's clock is {shown}: check NTP", warn=True)
    return Check("clock", True, f"within {CLOCK_WARN_S:.0f} s of S3's ({abs(skew):.1f} s)")


def _check_lock_sync(cfg: Config) -> Check:
    """The bucket's object-lock settings as they bear on the app: enabled (holds need it), and a default
    retention rule, which would keep every recording undeletable for its period (retention cannot purge
    earlier than that)."""
    from minio.error import S3Error

    st = cfg.storage
    if not st.enabled:
        return Check("lock", True, "storage disabled")
    client = _doctor_client(st)
    try:
        lock = client.get_object_lock_config(st.bucket)
    except S3Error as exc:
        if exc.code in ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"):
            return Check(
                "lock", True, f"bucket {st.bucket!r}: object lock NOT enabled (holds cannot work)", warn=True
            )
        if exc.code == "NoSuchBucket":
            return Check("lock", False, f"bucket {st.bucket!r} does not exist (kasuhara storage init)")
        return Check("lock", False, f"bucket {st.bucket!r}: object lock settings unreadable ({exc.code})")
    except Exception as exc:
        return Check("lock", False, f"{st.endpoint}: {type(exc).__name__}")
    if lock is None:
        return Check("lock", True, f"bucket {st.bucket!r}: object lock NOT enabled", warn=True)
    mode, duration, unit = lock.mode, lock.duration, lock.duration_unit
    if not mode:
        detail = f"bucket {st.bucket!r}: object lock on, no default retention (holds are legal holds)"
        return Check("lock", True, detail)
    days = int(duration or 0) * (365 if str(unit).upper().startswith("YEAR") else 1)
    detail = f"bucket {st.bucket!r}: object lock on, default retention {mode} {days} days"
    if days > cfg.retention.days:
        return Check(
            "lock",
            True,
            f"{detail}: longer than retention.days = {cfg.retention.days}, so recordings outlive it",
            warn=True,
        )
    return Check("lock", True, detail)


async def check_metrics(cfg: Config) -> Check:
    """``/metrics`` (``[metrics]``): off, refused (a public bind without consent), or which commands
    answer on their ports now. A port that answers with something else is another exporter in the way."""
    import httpx

    from .metrics import bind_refusal

    m = cfg.metrics
    if not m.enabled:
        return Check("metrics", True, "off (metrics.enabled = false)")
    refusal = bind_refusal(m)
    if refusal is not None:
        return Check("metrics", False, refusal)
    host = m.bind.strip().strip("[]")
    host = f"[{host}]" if ":" in host else host
    ports = {
        "serve": m.serve_port,
        "agi": m.agi_port,
        "retention daemon": m.retention_port,
        "web": m.web_port,
    }
    answering, foreign = [], []
    async with httpx.AsyncClient(timeout=2) as http:
        for command, port in ports.items():
            try:
                resp = await http.get(f"http://{host}:{port}/metrics")
            except httpx.HTTPError:
                continue
            if resp.status_code == 200 and "kasuhara_uploads_total" in resp.text:
                answering.append(f"{command} :{port}")
            else:
                foreign.append(f"{command}'s port {port} answers {resp.status_code} without kasuhara metrics")
    if foreign:
        return Check("metrics", False, "; ".join(foreign) + " (another exporter on it?)")
    if not answering:
        return Check(
            "metrics",
            True,
            f"http://{host}:{m.serve_port}/metrics: nothing answering (serve not running?)",
            warn=True,
        )
    return Check("metrics", True, f"http://{host}: answering: {', '.join(answering)}")


def configured_sounds(cfg: Config) -> dict[str, str]:
    """Every prompt the app may play, by config key (``announcement.sound``, …); an empty one plays
    nothing, a ``tone:`` is generated by Asterisk: neither is a file to look for."""
    found: dict[str, str] = {}
    for section in ("announcement", "escalation", "policy"):
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.name.endswith("sound") and isinstance(value, str) and value and ":" not in value:
                found[f"{section}.{f.name}"] = value
    return found


async def check_prompts(cfg: Config) -> Check:
    """Each configured prompt exists in Asterisk in ``announcement.language`` (ARI ``/sounds``): a missing
    one would leave a caller in silence where the notice should be."""
    if cfg.ari.mode == "listen":
        return Check("prompts", True, "listen mode: not checked here (only serve speaks ARI)", warn=True)
    lang = cfg.announcement.language
    missing: list[str] = []
    async with AriClient(cfg.ari.url, cfg.ari.username, cfg.ari.password, cfg.ari.app, timeout=3) as ari:
        for key, name in configured_sounds(cfg).items():
            try:
                doc = await ari.request("GET", f"/sounds/{quote(name, safe='')}")
            except ChannelGone:
                missing.append(f"{name} ({key})")
                continue
            except AriError as exc:
                return Check("prompts", False, f"{cfg.ari.url}: {exc}")
            formats = doc.get("formats") if isinstance(doc, dict) else None
            languages = {str(f.get("language")) for f in formats or [] if isinstance(f, dict)}
            if lang not in languages:
                missing.append(f"{name} ({key}; only {', '.join(sorted(languages)) or 'none'})")
    if missing:
        return Check("prompts", False, f"not in language {lang}: {'; '.join(missing)}")
    return Check("prompts", True, f"{len(configured_sounds(cfg))} prompts present in {lang}")


async def run_checks(cfg: Config) -> list[Check]:
    results = await asyncio.gather(
        check_ari(cfg),
        check_prompts(cfg),
        check_ami(cfg),
        check_mqtt(cfg),
        asyncio.to_thread(_check_s3_sync, cfg),
        asyncio.to_thread(_check_lock_sync, cfg),
        check_clock(cfg),
        check_web(cfg),
        check_metrics(cfg),
    )
    return [Check("config", True, cfg.source or "(environment only)"), *results, check_spool(cfg)]
