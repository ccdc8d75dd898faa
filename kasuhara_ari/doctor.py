"""``kasuhara doctor``: checks every dependency and says exactly what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import ssl
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from .ami import AmiClient, AmiError
from .ari import AriClient, AriError
from .config import Config, console_keys, web_bind_refusal
from .events import mqtt_tls_context
from .safe import printable


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


#: Asterisk modules the app needs beyond ARI itself, and the setting that needs them.
NEEDED_MODULES = {
    "app_mixmonitor.so": None,
    "res_stasis_snoop.so": None,  # kasuhara supervise (listen, whisper)
    "func_talkdetect.so": "detection.mode",  # live detection (TALK_DETECT)
}


async def check_ari(cfg: Config) -> Check:
    async with AriClient(cfg.ari.url, cfg.ari.username, cfg.ari.password, cfg.ari.app, timeout=3) as ari:
        try:
            info = await ari.info()
        except AriError as exc:
            return Check("ari", False, f"{cfg.ari.url}: {exc}")
        missing = []
        for module, setting in NEEDED_MODULES.items():
            if setting == "detection.mode" and cfg.detection.mode == "off":
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
        return Check("ami", True, f"{ami.address} logged in; MixMonitor allowed")
    except AmiError as exc:
        return Check("ami", False, str(exc))
    finally:
        ami.close()


async def check_mqtt(cfg: Config) -> Check:
    if not cfg.mqtt.enabled:
        return Check("mqtt", True, "disabled (mqtt.enabled = false)")
    import aiomqtt

    try:
        async with aiomqtt.Client(
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


def _check_s3_sync(cfg: Config) -> Check:
    import urllib3
    from minio import Minio
    from minio.error import S3Error

    st = cfg.storage
    if not st.enabled:
        return Check("s3", True, "disabled (storage.enabled = false)")
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=3, read=5), retries=urllib3.Retry(total=0))
    client = Minio(
        st.endpoint,
        access_key=st.access_key,
        secret_key=st.secret_key,
        secure=st.secure,
        region=st.region,
        http_client=http,
    )
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
    return Check("spool", ok, "; ".join(details))


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


async def run_checks(cfg: Config) -> list[Check]:
    results = await asyncio.gather(
        check_ari(cfg),
        check_ami(cfg),
        check_mqtt(cfg),
        asyncio.to_thread(_check_s3_sync, cfg),
        check_web(cfg),
    )
    return [Check("config", True, cfg.source or "(environment only)"), *results, check_spool(cfg)]
