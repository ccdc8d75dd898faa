"""``kasuhara users`` against the real S3 server of the stack (moto), a fresh bucket per test, run as the
operator runs it: a subprocess with the password on stdin, or typed at a pseudo-terminal's prompts."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from kasuhara_ari.accounts import ACCOUNTS_KEY, Accounts, Role, password_hasher
from kasuhara_ari.storage import MinioStore, PutResult

from conftest import REPO
from recordings_seed import cli_command, cli_env
from s3_fixture import S3Target, fresh_bucket, open_store

pytestmark = pytest.mark.integration

PW = "a long enough passphrase"
PW2 = "another passphrase 2"


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    with fresh_bucket("ku") as (target, bucket):
        yield cli_env(target, bucket)


def users(env: Mapping[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command("users", *args),
        env=dict(env),
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def target_of(env: Mapping[str, str]) -> tuple[S3Target, str]:
    return (
        S3Target(
            env["KASUHARA_STORAGE__ENDPOINT"],
            env["KASUHARA_STORAGE__ACCESS_KEY"],
            env["KASUHARA_STORAGE__SECRET_KEY"],
            env["KASUHARA_STORAGE__REGION"],
        ),
        env["KASUHARA_STORAGE__BUCKET"],
    )


def bucket_objects(env: Mapping[str, str], prefix: str) -> dict[str, bytes]:
    """Every object (latest versions) under ``prefix`` with its bytes."""
    target, bucket = target_of(env)
    store = open_store(target, bucket)
    try:
        client = store.client
        out: dict[str, bytes] = {}
        for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
            response = client.get_object(bucket, obj.object_name)
            try:
                out[obj.object_name] = response.read()
            finally:
                response.close()
                response.release_conn()
        return out
    finally:
        store.close()


def verify(env: Mapping[str, str], name: str, password: str) -> Any:
    target, bucket = target_of(env)
    store = open_store(target, bucket)
    try:
        return asyncio.run(Accounts(store).verify(name, password))
    finally:
        store.close()


def audit_records(env: Mapping[str, str]) -> list[dict[str, Any]]:
    return [json.loads(data) for _, data in sorted(bucket_objects(env, "audit/").items())]


def test_admin_manages_users_and_every_change_is_audited_without_secrets(env: dict[str, str]) -> None:
    runs = [
        users(env, "add", "alice", "--role", "admin", "--password-stdin", stdin=PW + "\n"),
        users(env, "add", "bob", "--role", "viewer", "--password-stdin", "--reason", "new hire", stdin=PW),
    ]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert runs[0].stdout.strip() == "alice: added (admin)"

    listed = users(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert [(u["name"], u["role"], u["disabled"]) for u in doc["users"]] == [
        ("alice", "admin", False),
        ("bob", "viewer", False),
    ]
    assert set(doc["users"][0]) == {"name", "role", "disabled", "created_at", "changed_at", "endpoint"}
    assert "argon2" not in listed.stdout
    runs.append(listed)
    table = users(env, "list")
    assert "argon2" not in table.stdout and "bob" in table.stdout and "viewer" in table.stdout
    runs.append(table)

    # the stored document: argon2id hashes, no password
    stored = bucket_objects(env, "users/")
    assert list(stored) == [ACCOUNTS_KEY]
    assert json.loads(stored[ACCOUNTS_KEY])["users"]["bob"]["hash"].startswith("$argon2id$")
    assert PW.encode() not in stored[ACCOUNTS_KEY]
    assert verify(env, "bob", PW) is not None

    runs.append(users(env, "passwd", "bob", "--password-stdin", stdin=PW2 + "\n"))
    assert runs[-1].returncode == 0, runs[-1].stderr
    assert verify(env, "bob", PW) is None
    assert verify(env, "bob", PW2) is not None

    runs.append(users(env, "disable", "bob"))
    assert runs[-1].returncode == 0 and runs[-1].stdout.strip() == "bob: disabled"
    assert verify(env, "bob", PW2) is None
    runs.append(users(env, "disable", "bob"))
    assert runs[-1].returncode == 0 and "nothing to do" in runs[-1].stdout
    runs.append(users(env, "enable", "bob"))
    assert runs[-1].returncode == 0 and verify(env, "bob", PW2) is not None
    runs.append(users(env, "role", "bob", "supervisor"))
    assert runs[-1].returncode == 0 and runs[-1].stdout.strip() == "bob: viewer -> supervisor"
    assert verify(env, "bob", PW2).role is Role.SUPERVISOR

    records = audit_records(env)
    assert [(r["action"], r["target"], r["by"]) for r in records] == [
        ("user_add", {"user": "alice"}, "test-admin"),
        ("user_add", {"user": "bob"}, "test-admin"),
        ("user_passwd", {"user": "bob"}, "test-admin"),
        ("user_disable", {"user": "bob"}, "test-admin"),
        ("user_enable", {"user": "bob"}, "test-admin"),
        ("user_role", {"user": "bob"}, "test-admin"),
    ]
    assert records[1]["reason"] == "new hire" and records[1]["details"] == {"role": "viewer"}
    raw = b"".join(bucket_objects(env, "audit/").values()) + b"".join(
        bucket_objects(env, "audit-chains/").values()
    )
    for secret in (PW, PW2, "argon2"):
        assert secret.encode() not in raw
        for r in runs:
            assert secret not in r.stdout and secret not in r.stderr
    assert all(r.stderr == "" for r in runs), [r.stderr for r in runs]  # quiet CLI: results only


def test_changes_without_admin_credentials_are_refused(env: dict[str, str]) -> None:
    no_admin = {k: v for k, v in env.items() if not k.startswith("KASUHARA_ADMIN__")}
    for args in (
        ("add", "alice", "--role", "admin", "--password-stdin"),
        ("passwd", "alice", "--password-stdin"),
        ("disable", "alice"),
        ("enable", "alice"),
        ("role", "alice", "viewer"),
    ):
        refused = users(no_admin, *args, stdin=PW + "\n")
        assert refused.returncode == 3, (args, refused.stderr)
        assert "admin S3 credentials" in refused.stderr
    assert bucket_objects(env, "users/") == {}
    # reading needs no admin keys (the console reads with the service's)
    assert users(no_admin, "list", "--json").returncode == 0


@pytest.mark.parametrize("name", ["Alice", "../alice", "a/b", "_x", "a b", "a" * 65, "ユーザー", "a\u202e"])
def test_unsafe_names_exit_2(env: dict[str, str], name: str) -> None:
    bad = users(env, "add", name, "--role", "viewer", "--password-stdin", stdin=PW)
    assert bad.returncode == 2, bad.stderr
    assert "not a user name" in bad.stderr
    assert bucket_objects(env, "users/") == {}


def test_bad_passwords_and_missing_terminal_exit_2(env: dict[str, str]) -> None:
    short = users(env, "add", "alice", "--role", "admin", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "too short" in short.stderr and "short\n" not in short.stderr
    same = users(env, "add", "operator-0001", "--role", "admin", "--password-stdin", stdin="operator-0001\n")
    assert same.returncode == 2 and "user name" in same.stderr
    no_tty = users(env, "add", "alice", "--role", "admin", stdin=PW + "\n")  # stdin is a pipe, no flag
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    assert bucket_objects(env, "users/") == {}


def test_the_last_admin_cannot_be_disabled_or_demoted(env: dict[str, str]) -> None:
    assert users(env, "add", "alice", "--role", "admin", "--password-stdin", stdin=PW).returncode == 0
    for args in (("disable", "alice"), ("role", "alice", "supervisor")):
        refused = users(env, *args)
        assert refused.returncode == 3, refused.stderr
        assert "last enabled admin" in refused.stderr
    assert users(env, "add", "bob", "--role", "admin", "--password-stdin", stdin=PW).returncode == 0
    assert users(env, "disable", "alice").returncode == 0
    unknown = users(env, "disable", "carol")
    assert unknown.returncode == 1 and "no user 'carol'" in unknown.stderr
    taken = users(env, "add", "bob", "--role", "viewer", "--password-stdin", stdin=PW)
    assert taken.returncode == 1 and "exists" in taken.stderr
    assert [r["action"] for r in audit_records(env)] == ["user_add", "user_add", "user_disable"]


class RacingStore(MinioStore):
    """The real S3 client, with every write of the accounts document held back until both writers have
    read it: the race that the conditional replace must win on the real server."""

    def __init__(self, barrier: asyncio.Event, reads: list[int], **kw: Any) -> None:
        super().__init__(**kw)
        self.barrier, self.reads = barrier, reads

    async def get_bytes(self, key: str, **kw: Any) -> bytes | None:
        data = await super().get_bytes(key, **kw)
        self.reads.append(1)
        if len(self.reads) >= 2:
            self.barrier.set()
        return data

    async def put_bytes_if(self, key: str, data: bytes, **kw: Any) -> PutResult:
        await asyncio.wait_for(self.barrier.wait(), 30)
        return await super().put_bytes_if(key, data, **kw)

    async def put_bytes(self, key: str, data: bytes, **kw: Any) -> PutResult:
        await asyncio.wait_for(self.barrier.wait(), 30)
        return await super().put_bytes(key, data, **kw)


@pytest.mark.parametrize("existing", [False, True], ids=["first-document", "existing-document"])
def test_two_admins_adding_at_once_both_land_on_the_real_server(env: dict[str, str], existing: bool) -> None:
    if existing:
        assert users(env, "add", "root", "--role", "admin", "--password-stdin", stdin=PW).returncode == 0
    target, bucket = target_of(env)
    fast = password_hasher(time_cost=1, memory_cost=1024, parallelism=1)

    async def race() -> int:
        barrier, reads = asyncio.Event(), []
        stores = [
            RacingStore(
                barrier,
                reads,
                endpoint=target.endpoint,
                access_key=target.access_key,
                secret_key=target.secret_key,
                bucket=bucket,
                region=target.region,
            )
            for _ in range(2)
        ]
        try:
            await asyncio.gather(
                Accounts(stores[0], hasher=fast).add("bob", Role.VIEWER, PW),
                Accounts(stores[1], hasher=fast).add("carol", Role.SUPERVISOR, PW),
            )
        finally:
            for s in stores:
                s.close()
        return len(reads)

    reads = asyncio.run(race())
    listed = json.loads(users(env, "list", "--json").stdout)
    expected = ["bob", "carol", "root"] if existing else ["bob", "carol"]
    assert [u["name"] for u in listed["users"]] == expected
    assert reads >= 3  # the loser re-read the winner's document and added its user to it


def in_terminal(env: Mapping[str, str], args: tuple[str, ...], answers: list[str]) -> tuple[int, str]:
    """Run ``kasuhara users ARGS`` with a pseudo-terminal as its controlling terminal (what getpass
    reads), typing ``answers`` at its prompts; returns the exit code and everything the terminal showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the CLI
        os.chdir(REPO)
        os.execve(sys.executable, cli_command("users", *args), dict(env))
    shown, pending = b"", list(answers)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            # Answer a prompt only once it is on screen (getpass has switched echo off by then, and
            # flushes what was typed earlier), never on the newline that follows the previous answer.
            if pending and shown.endswith(b": "):
                os.write(fd, pending.pop(0).encode() + b"\n")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_the_password_is_asked_twice_at_a_terminal_and_never_echoed(env: dict[str, str]) -> None:
    code, shown = in_terminal(env, ("add", "alice", "--role", "admin"), [PW, PW])
    assert code == 0, shown
    assert "New password for alice:" in shown and "Repeat it:" in shown
    assert PW not in shown  # echo off
    assert verify(env, "alice", PW) is not None
    code, shown = in_terminal(env, ("passwd", "alice"), [PW2, PW2 + "typo"])
    assert code == 2 and "differ" in shown, shown
    assert verify(env, "alice", PW) is not None  # unchanged


def test_a_broken_accounts_document_is_reported_not_overwritten(env: dict[str, str]) -> None:
    target, bucket = target_of(env)
    store = open_store(target, bucket)
    try:
        asyncio.run(store.put_bytes(ACCOUNTS_KEY, b'{"version": 7}', metadata={}))
    finally:
        store.close()
    broken = users(env, "add", "alice", "--role", "admin", "--password-stdin", stdin=PW)
    assert broken.returncode == 1 and "not a version 1 accounts document" in broken.stderr
    assert bucket_objects(env, "users/") == {ACCOUNTS_KEY: b'{"version": 7}'}
