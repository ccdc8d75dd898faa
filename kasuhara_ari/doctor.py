"""``kasuhara doctor``: checks every dependency and says exactly what is wrong."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from .ami import AmiClient, AmiError
from .ari import AriClient, AriError
from .config import Config


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


async def check_ari(cfg: Config) -> Check:
    async with AriClient(cfg.ari.url, cfg.ari.username, cfg.ari.password, cfg.ari.app, timeout=3) as ari:
        try:
            info = await ari.info()
        except AriError as exc:
            return Check("ari", False, f"{cfg.ari.url}: {exc}")
    version = (info.get("system") or {}).get("version", "?")
    return Check("ari", True, f"{cfg.ari.url} Asterisk {version}")


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
            timeout=3,
        ) as client:
            await client.publish(f"{cfg.mqtt.topic_prefix}/doctor", b"{}", qos=1)
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        return Check("mqtt", False, f"{cfg.mqtt.host}:{cfg.mqtt.port}: {exc}")
    return Check("mqtt", True, f"{cfg.mqtt.host}:{cfg.mqtt.port} publish ok")


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


def check_spool(cfg: Config) -> Check:
    path = Path(cfg.recording.host_dir)
    if not path.is_dir():
        return Check("spool", False, f"{path} does not exist (recording.local_dir / asterisk_dir)")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("spool", False, f"{path}: not writable ({exc.strerror})")
    if not os.access(path, os.R_OK):
        return Check("spool", False, f"{path}: not readable")
    return Check("spool", True, str(path))


async def run_checks(cfg: Config) -> list[Check]:
    results = await asyncio.gather(
        check_ari(cfg), check_ami(cfg), check_mqtt(cfg), asyncio.to_thread(_check_s3_sync, cfg)
    )
    return [Check("config", True, cfg.source or "(environment only)"), *results, check_spool(cfg)]
