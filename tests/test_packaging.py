"""The wheel is the product: built from the checkout, installed into a fresh venv outside it, it runs on its
own — ``kasuhara --version``, ``kasuhara doctor`` and ``kasuhara serve`` taking a real SIP call — without
reading a file of the checkout (the interpreter runs in a scratch directory, and the tests check where the
package was imported from).

The wheel and its venv are built once per content of the sources (a lock and a directory keyed by their
hash), so the two xdist workers and later runs on the same machine share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from test_flag_e2e_sip import _registered

from kasuhara_ari.config import Config

from conftest import REPO, STACK_CONFIG, skip_or_fail
from s3_fixture import create_bucket, destroy_bucket, fresh_bucket, open_store, require_s3, unique_bucket
from sip import agent_port, answering, caller

pytestmark = pytest.mark.integration

CACHE = Path(tempfile.gettempdir()) / "kasuhara-test-wheel"
#: What a wheel must carry for the console and the schemas to work from an install.
PACKAGE_DATA = (
    "kasuhara_ari/py.typed",
    "kasuhara_ari/schemas/event-1.json",
    "kasuhara_ari/schemas/recording-1.json",
    "kasuhara_ari/web/templates/base.html",
    "kasuhara_ari/web/templates/login.html",
    "kasuhara_ari/web/static/console.css",
    "kasuhara_ari/data/systemd/kasuhara-serve.service",
    "kasuhara_ari/data/sounds/ja/kasuhara/recording-notice.wav",
    "kasuhara_ari/data/sounds/en/kasuhara/recording-notice.wav",
    "kasuhara_ari/data/prometheus/alerts.yml",
    "kasuhara_ari/data/grafana/kasuhara.json",
)


def sources_hash() -> str:
    """The hash of everything that goes into the wheel (a changed template means a new wheel)."""
    digest = hashlib.sha256()
    for path in sorted([REPO / "pyproject.toml", *(REPO / "kasuhara_ari").rglob("*")]):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload,no-any-return]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of an installed `kasuhara`: no PYTHONPATH, no test config overrides."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("KASUHARA_") and "__" in k)}
    for name in ("PYTHONPATH", "KASUHARA_CONFIG", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def installed() -> Path:
    """A venv outside the checkout with the wheel built from it (and its dependencies) installed."""
    key = sources_hash()
    CACHE.mkdir(exist_ok=True)
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        venv = CACHE / f"venv-{key}"
        if (venv / "ok").exists():
            return venv
        for old in CACHE.glob("venv-*"):
            shutil.rmtree(old, ignore_errors=True)
        for old in CACHE.glob("wheel-*"):
            shutil.rmtree(old, ignore_errors=True)
        wheels = CACHE / f"wheel-{key}"
        built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)])
        if built.returncode != 0:
            skip_or_fail(
                f"the wheel could not be built (is the package index reachable?): {built.stderr[-800:]}"
            )
        made = run([sys.executable, "-m", "venv", str(venv)])
        assert made.returncode == 0, made.stderr
        wheel = next(wheels.glob("kasuhara_ari-*.whl"))
        pip = run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)], cwd=str(CACHE))
        if pip.returncode != 0:
            skip_or_fail(f"the wheel's dependencies could not be installed: {pip.stderr[-800:]}")
        (venv / "ok").write_text(wheel.name)
        return venv


def wheel_of(venv: Path) -> Path:
    name = (venv / "ok").read_text()
    return venv.parent / venv.name.replace("venv-", "wheel-") / name


def test_the_wheel_carries_its_package_data_and_no_tests(installed: Path) -> None:
    names = set(zipfile.ZipFile(wheel_of(installed)).namelist())
    missing = [n for n in PACKAGE_DATA if n not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]
    assert not [n for n in names if "/kasuhara/test-" in n], "the test suite's prompt is not for a PBX"
    # Every template and static file of the checkout is in it (a new one needs no pyproject edit).
    for folder in ("templates", "static"):
        for path in (REPO / "kasuhara_ari/web" / folder).iterdir():
            assert f"kasuhara_ari/web/{folder}/{path.name}" in names, path


def test_the_installed_kasuhara_runs_from_its_venv_and_checks_the_stack(
    installed: Path, tmp_path: Path
) -> None:
    kasuhara = str(installed / "bin/kasuhara")
    version = run([kasuhara, "--version"], cwd=str(tmp_path), env=clean_env())
    expected = run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('kasuhara-ari'))"])
    assert version.returncode == 0 and version.stdout.split()[-1] == expected.stdout.strip(), version
    where = run(
        [
            str(installed / "bin/python"),
            "-c",
            "import kasuhara_ari.web.app as a, kasuhara_ari.cli as c; print(a.__file__); print(c.__file__)",
        ],
        cwd=str(tmp_path),
        env=clean_env(),
    )
    for line in where.stdout.split():
        assert Path(line).is_relative_to(installed), f"imported from outside the install: {line}"
    # A bucket of its own (object lock on), so that the S3 and console checks have something to find.
    with fresh_bucket("kpd") as (_, bucket):
        doctor = run(
            [kasuhara, "doctor", "--json"],
            cwd=str(tmp_path),
            env=clean_env(KASUHARA_CONFIG=str(STACK_CONFIG), KASUHARA_STORAGE__BUCKET=bucket),
        )
    checks = json.loads(doctor.stdout)
    for name in ("config", "ari", "ami", "mqtt", "s3", "spool", "web"):
        assert checks[name]["ok"], (name, checks[name])


async def test_the_installed_serve_records_a_real_sip_call_into_s3(
    installed: Path,
    asterisk: Config,
    mqtt_broker: Config,
    s3_server: Config,
    sip_workdir: Path,
    tmp_path: Path,
) -> None:
    """`kasuhara serve` of the install takes a call through the stack's Asterisk: notice, agent, hang-up,
    and the recording with its metadata lands in S3."""
    target = require_s3()
    uid = uuid.uuid4().hex[:10]
    app = f"kasuhara-pkg{uid}"
    bucket = unique_bucket("kt-pkg")
    store = open_store(target, bucket)
    create_bucket(store)
    spool = asterisk.recording.host_dir / f"pkg-{uid}"
    spool.mkdir(mode=0o777)
    env = clean_env(
        KASUHARA_CONFIG=str(STACK_CONFIG),
        KASUHARA_ARI__APP=app,
        KASUHARA_STORAGE__BUCKET=bucket,
        KASUHARA_STORAGE__ENABLED="true",
        KASUHARA_MQTT__TOPIC_PREFIX=f"kt-pkg-{uid}",
        KASUHARA_RECORDING__ASTERISK_DIR=f"{asterisk.recording.asterisk_dir}/pkg-{uid}",
        KASUHARA_RECORDING__LOCAL_DIR=str(spool),
    )
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [str(installed / "bin/kasuhara"), "serve"],
        env=env,
        cwd=str(tmp_path),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    phones = []
    try:
        await _registered(asterisk, app, 30)
        port = agent_port()
        agent = await answering(sip_workdir, port, ring_ms=300).start()
        customer = await caller(sip_workdir, port, app=app, call_ms=9000).start()
        phones = [agent, customer]
        assert await customer.wait(90) == 0, customer.error_text()
        await agent.wait(20)
        deadline = time.monotonic() + 60
        stored: list[str] = []
        while len(stored) < 2:
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"nothing stored in S3:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.5)
            stored = [
                o.object_name
                for o in await asyncio.to_thread(
                    lambda: list(store.client.list_objects(bucket, prefix="recordings/", recursive=True))
                )
            ]
        name = next(n for n in stored if n.endswith(".json"))
        meta = json.loads(await asyncio.to_thread(lambda: store.client.get_object(bucket, name).read()))
    finally:
        for phone in phones:
            await phone.stop()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        with contextlib.suppress(Exception):
            destroy_bucket(target, bucket)
        shutil.rmtree(spool, ignore_errors=True)
    assert sorted(Path(name).suffix for name in stored) == [".json", ".wav"], stored
    assert serve.returncode == 0, log.read_text()[-3000:]
    assert meta["notice_played"] is True and meta["audio"]["bytes"] > 44, meta
