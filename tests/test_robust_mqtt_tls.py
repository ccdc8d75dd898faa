"""Issue 12: MQTT over TLS (``mqtt.tls``) against a real mosquitto TLS listener with a throwaway CA.

The CA, the broker's certificate (for 127.0.0.1) and a client certificate are made by this test with
``openssl``; mosquitto runs two TLS listeners, one that requires a client certificate. Before the fix
there was no TLS option at all: ``mqtt.tls`` was an unknown key and everything went in clear text.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from kasuhara_ari.config import ConfigError, MqttConfig, load
from kasuhara_ari.events import MqttEvents

from test_events import _mosquitto_binary, free_port, port_open

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
RUN_MONITOR = "from kasuhara_ari.cli.monitor import monitor; monitor()"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path, name: str = "ca") -> None:
    """``<name>.pem`` (a CA), ``server.pem``/``server.key`` for 127.0.0.1, ``client.pem``/``client.key``."""
    d.mkdir(parents=True, exist_ok=True)
    subject = f"/CN=kasuhara test {name}"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", f"{who}.key",
                "-out", f"{who}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{name}.pem", "-CAkey", f"{name}.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{who}.pem",
                cwd=d)  # fmt: skip


@dataclass
class TlsBroker:
    pki: Path
    port: int  # TLS, server certificate only
    mtls_port: int  # TLS, client certificate required
    plain_port: int  # the same broker in clear text, for the subscriber's cross-check


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    work = tmp_path_factory.mktemp("mqtt-tls")
    pki = work / "pki"
    make_pki(pki)
    broker = TlsBroker(pki, free_port(), free_port(), free_port())
    conf = work / "mosquitto.conf"
    tls = f"cafile {pki}/ca.pem\ncertfile {pki}/server.pem\nkeyfile {pki}/server.key\n"
    conf.write_text(
        f"per_listener_settings false\nallow_anonymous true\nuser {getpass.getuser()}\nlog_dest stderr\n"
        f"listener {broker.plain_port} 127.0.0.1\n"
        f"listener {broker.port} 127.0.0.1\n{tls}"
        f"listener {broker.mtls_port} 127.0.0.1\n{tls}require_certificate true\n"
    )
    log = (work / "mosquitto.log").open("ab")
    proc = subprocess.Popen([_mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not all(port_open(p) for p in (broker.port, broker.mtls_port, broker.plain_port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "mosquitto.log").read_text()[-2000:])
            time.sleep(0.05)
        yield broker
    finally:
        proc.terminate()
        proc.wait(10)


def tls_config(broker: TlsBroker, prefix: str, **over: object) -> MqttConfig:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": broker.port,
        "topic_prefix": prefix,
        "tls": True,
        "ca_file": str(broker.pki / "ca.pem"),
    }
    values.update(over)
    return MqttConfig(**values)  # type: ignore[arg-type]


async def plain_retained_status(broker: TlsBroker, prefix: str) -> dict[str, object]:
    async with aiomqtt.Client("127.0.0.1", broker.plain_port, timeout=5) as client:
        await client.subscribe(f"{prefix}/status", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                doc = json.loads(message.payload)
                assert isinstance(doc, dict)
                return doc
    raise AssertionError("no status")


async def test_events_are_published_over_tls_with_the_disk_state_in_the_status(tls_broker: TlsBroker) -> None:
    prefix = f"kasuhara-tls/{uuid.uuid4().hex[:10]}"
    ctx = ssl.create_default_context(cafile=str(tls_broker.pki / "ca.pem"))
    async with aiomqtt.Client("127.0.0.1", tls_broker.port, tls_context=ctx, timeout=5) as sub:
        await sub.subscribe(f"{prefix}/#", qos=1)
        async with MqttEvents(tls_config(tls_broker, prefix)) as events:
            events.emit("started", "c1", direction="inbound", caller={"number": "0312345678", "name": None})
            events.set_status_detail("spool_disk", {"state": "full", "path": "/spool", "free_bytes": 0})
            seen: list[dict[str, object]] = []
            async with asyncio.timeout(15):
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    seen.append(json.loads(message.payload))
                    events_seen = {p["event"] for p in seen}
                    if "started" in events_seen and any(p.get("spool_disk") for p in seen):
                        break
    assert [p["event"] for p in seen if p["event"] != "status"] == ["started"]
    # The retained status carries the spool's disk state (as serve's uploader reports it).
    status = await plain_retained_status(tls_broker, prefix)
    assert status["event"] == "status"
    assert status["state"] == "offline"  # closed since; the detail stays in every later status
    assert status["spool_disk"] == {"state": "full", "path": "/spool", "free_bytes": 0}


def run_monitor(broker: TlsBroker, prefix: str, port: int, **env: str) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    base.update(
        KASUHARA_MQTT__PORT=str(port),
        KASUHARA_MQTT__TOPIC_PREFIX=prefix,
        KASUHARA_MQTT__TLS="true",
        KASUHARA_MQTT__CA_FILE=str(broker.pki / "ca.pem"),
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, "-c", RUN_MONITOR, "--json", "--duration", "3"],
        cwd=REPO,
        env=base,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_monitor_verifies_the_broker_and_presents_a_client_certificate(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    prefix = f"kasuhara-tls/{uuid.uuid4().hex[:10]}"
    ok = run_monitor(tls_broker, prefix, tls_broker.port)
    assert ok.returncode == 0, ok.stderr
    assert b"monitoring" in ok.stderr
    # A broker whose certificate another CA signed is refused: the chain is verified.
    make_pki(tmp_path / "other", "other")
    wrong = run_monitor(
        tls_broker, prefix, tls_broker.port, KASUHARA_MQTT__CA_FILE=str(tmp_path / "other/other.pem")
    )
    assert wrong.returncode == 1 and b"cannot reach the MQTT broker" in wrong.stderr, wrong.stderr
    # The listener that requires a client certificate: refused without, accepted with.
    bare = run_monitor(tls_broker, prefix, tls_broker.mtls_port)
    assert b"monitoring" not in bare.stderr, bare.stderr  # TLS 1.3: the refusal comes after the handshake
    pki = tls_broker.pki
    with_cert = run_monitor(
        tls_broker,
        prefix,
        tls_broker.mtls_port,
        KASUHARA_MQTT__CERT_FILE=str(pki / "client.pem"),
        KASUHARA_MQTT__KEY_FILE=str(pki / "client.key"),
    )
    assert with_cert.returncode == 0 and b"monitoring" in with_cert.stderr, with_cert.stderr
    assert b"Traceback" not in wrong.stderr + bare.stderr


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match=r"mqtt\.ca_file: set only with mqtt\.tls"):
        load(None, env={"KASUHARA_MQTT__CA_FILE": str(ca)})
    with pytest.raises(ConfigError, match="give both"):
        load(None, env={"KASUHARA_MQTT__TLS": "true", "KASUHARA_MQTT__CERT_FILE": str(ca)})
    with pytest.raises(ConfigError, match="not a readable file"):
        load(None, env={"KASUHARA_MQTT__TLS": "true", "KASUHARA_MQTT__CA_FILE": str(tmp_path / "nope.pem")})
    cfg = load(None, env={"KASUHARA_MQTT__TLS": "true", "KASUHARA_MQTT__CA_FILE": str(ca)})
    assert cfg.mqtt.tls and cfg.mqtt.ca_file == str(ca) and not cfg.mqtt.tls_insecure
