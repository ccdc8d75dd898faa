"""Console accounts (kasuhara_ari.accounts): pure logic over the in-memory store.

The same code against the real S3 server runs in tests/test_users_cli.py (through `kasuhara users`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
from argon2 import PasswordHasher

from kasuhara_ari.accounts import (
    ACCOUNTS_KEY,
    PASSWORD_PARAMETERS,
    Account,
    AccountError,
    AccountExists,
    Accounts,
    AccountsCorrupt,
    LastAdminError,
    Role,
    UnknownAccount,
    password_hasher,
    role_at_least,
)
from kasuhara_ari.storage import MemoryStore, PutResult, StorageRefused, policy_documents

PW = "correct horse battery"
#: Cheap parameters so the suite does not spend seconds in argon2 (the defaults are checked apart).
FAST = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}


def accounts(store: MemoryStore | None = None, **params: int) -> Accounts:
    return Accounts(
        store if store is not None else MemoryStore(), hasher=password_hasher(**{**FAST, **params})
    )


def stored(store: MemoryStore) -> dict[str, Any]:
    latest = store.objects[ACCOUNTS_KEY][-1].data
    assert latest is not None
    doc = json.loads(latest)
    assert doc["version"] == 1
    users: dict[str, Any] = doc["users"]
    return users


def test_roles_are_ordered() -> None:
    assert role_at_least(Role.ADMIN, Role.SUPERVISOR)
    assert role_at_least(Role.SUPERVISOR, Role.SUPERVISOR)
    assert role_at_least(Role.SUPERVISOR, Role.VIEWER)
    assert not role_at_least(Role.VIEWER, Role.SUPERVISOR)
    assert not role_at_least(Role.SUPERVISOR, Role.ADMIN)
    assert Role.ADMIN == "admin" and isinstance(Role.VIEWER, str)


def test_default_parameters_are_rfc9106_second_option() -> None:
    ph = password_hasher()
    assert (ph.time_cost, ph.memory_cost, ph.parallelism, ph.hash_len, ph.salt_len) == (3, 65536, 4, 32, 16)
    assert dict(PASSWORD_PARAMETERS)["memory_cost"] == 65536


async def test_passwords_are_stored_as_argon2id_hashes() -> None:
    store = MemoryStore()
    acc = accounts(store)
    await acc.add("alice", Role.ADMIN, PW)
    entry = stored(store)["alice"]
    assert entry["hash"].startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert PW not in json.dumps(stored(store))
    assert PasswordHasher().verify(entry["hash"], PW)  # a standard argon2id hash, not ours alone


async def test_verify_right_wrong_unknown_disabled() -> None:
    acc = accounts()
    await acc.add("alice", Role.ADMIN, PW)
    await acc.add("bob", Role.VIEWER, PW + "!")
    ok = await acc.verify("bob", PW + "!")
    assert ok is not None and ok.name == "bob" and ok.role is Role.VIEWER
    assert await acc.verify("bob", PW) is None
    assert await acc.verify("carol", PW) is None
    assert await acc.verify("../etc", PW) is None
    assert await acc.verify("bob", "x" * 5000) is None
    await acc.set_disabled("bob", True)
    assert await acc.verify("bob", PW + "!") is None
    await acc.set_disabled("bob", False)
    assert await acc.verify("bob", PW + "!") is not None


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(**FAST)
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified += 1
        return super().verify(hash, password)


async def test_unknown_users_cost_a_hash_check_too() -> None:
    """The time of a failed login must not tell whether the name exists."""
    hasher = CountingHasher()
    acc = Accounts(MemoryStore(), hasher=hasher)
    await acc.add("alice", Role.ADMIN, PW)
    hasher.verified = 0
    assert await acc.verify("nobody", PW) is None
    assert await acc.verify("Not/A/Name", PW) is None
    assert hasher.verified == 2


async def test_a_hash_with_old_parameters_is_replaced_at_login() -> None:
    store = MemoryStore()
    await accounts(store, time_cost=1).add("alice", Role.ADMIN, PW)
    old = stored(store)["alice"]["hash"]
    newer = accounts(store, time_cost=2)
    assert (await newer.verify("alice", PW)) is not None
    new = stored(store)["alice"]["hash"]
    assert new != old and ",t=2," in new
    assert (await newer.verify("alice", PW)) is not None
    assert stored(store)["alice"]["hash"] == new  # no rehash when the parameters are current
    assert (await newer.verify("alice", "wrong password!")) is None
    assert stored(store)["alice"]["hash"] == new  # a failed login rewrites nothing


class ReadOnlyStore(MemoryStore):
    """What the console's keys are: the service role may read users/, never write it."""

    async def put_bytes_if(self, key: str, data: bytes, **kw: Any) -> PutResult:
        raise StorageRefused(f"put {key}: refused (AccessDenied)", code="AccessDenied")

    async def put_bytes(self, key: str, data: bytes, **kw: Any) -> PutResult:
        raise StorageRefused(f"put {key}: refused (AccessDenied)", code="AccessDenied")


async def test_login_works_when_the_rehash_cannot_be_written() -> None:
    admin_store = MemoryStore()
    await accounts(admin_store, time_cost=1).add("alice", Role.ADMIN, PW)
    store = ReadOnlyStore()
    store.objects = admin_store.objects
    found = await accounts(store, time_cost=2).verify("alice", PW)
    assert found is not None and found.name == "alice"
    assert ",t=1," in stored(store)["alice"]["hash"]


async def test_the_last_enabled_admin_cannot_be_disabled_or_demoted() -> None:
    acc = accounts()
    await acc.add("alice", Role.ADMIN, PW)
    await acc.add("bob", Role.SUPERVISOR, PW)
    with pytest.raises(LastAdminError, match="last enabled admin"):
        await acc.set_disabled("alice", True)
    with pytest.raises(LastAdminError):
        await acc.set_role("alice", Role.SUPERVISOR)
    await acc.set_role("bob", Role.ADMIN)
    await acc.set_disabled("alice", True)  # bob is still an enabled admin
    with pytest.raises(LastAdminError):  # a disabled admin does not count
        await acc.set_role("bob", Role.VIEWER)
    await acc.set_disabled("alice", False)
    await acc.set_role("bob", Role.VIEWER)
    assert [(a.name, a.role, a.disabled) for a in await acc.list()] == [
        ("alice", Role.ADMIN, False),
        ("bob", Role.VIEWER, False),
    ]


@pytest.mark.parametrize(
    "name", ["", "Alice", "-x", ".x", "a/b", "../x", "a b", "a" * 65, "ユーザー", "a\n", "a\u202e", "a:b"]
)
async def test_unsafe_names_are_refused(name: str) -> None:
    acc = accounts()
    with pytest.raises(AccountError, match="not a user name"):
        await acc.add(name, Role.VIEWER, PW)
    assert await acc.get(name) is None
    assert ACCOUNTS_KEY not in acc.store.objects  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["a", "agent-12", "sato.k", "x_1", "0", "a" * 64])
async def test_safe_names_are_accepted(name: str) -> None:
    acc = accounts()
    await acc.add(name, Role.VIEWER, PW)
    assert (await acc.get(name)) == (await acc.list())[0]


@pytest.mark.parametrize(
    ("password", "why"),
    [("short pass", "too short"), ("operator-0001", "user name"), ("x" * 1025, "too long")],
)
async def test_weak_passwords_are_refused(password: str, why: str) -> None:
    acc = accounts()
    with pytest.raises(AccountError, match=why) as info:
        await acc.add("operator-0001", Role.VIEWER, password)
    assert password not in str(info.value)


async def test_duplicates_unknown_users_and_bad_roles() -> None:
    acc = accounts()
    await acc.add("alice", Role.ADMIN, PW)
    with pytest.raises(AccountExists):
        await acc.add("alice", Role.VIEWER, PW)
    with pytest.raises(UnknownAccount):
        await acc.set_password("nobody", PW)
    with pytest.raises(UnknownAccount):
        await acc.set_disabled("nobody", True)
    with pytest.raises(AccountError, match="unknown role"):
        await acc.add("bob", "root", PW)  # type: ignore[arg-type]


async def test_set_password_replaces_the_old_one() -> None:
    acc = accounts()
    await acc.add("alice", Role.ADMIN, PW)
    await acc.set_password("alice", "a new passphrase")
    assert await acc.verify("alice", PW) is None
    assert await acc.verify("alice", "a new passphrase") is not None


async def test_no_hash_in_what_callers_see() -> None:
    acc = accounts()
    added = await acc.add("alice", Role.ADMIN, PW)
    shown = [added, await acc.get("alice"), *(await acc.list()), await acc.verify("alice", PW)]
    for account in shown:
        assert isinstance(account, Account)
        assert "argon2" not in repr(account) and "argon2" not in str(account)
        assert not hasattr(account, "hash")
    users = await acc._users()
    assert "argon2" not in repr(users)  # not even the internal entries show it in a traceback


async def test_a_broken_document_is_refused_not_guessed() -> None:
    store = MemoryStore()
    acc = accounts(store)
    for doc in (b"not json", b'{"version": 2, "users": {}}', b'{"version": 1, "users": {"A B": {}}}'):
        store.objects.clear()
        await store.put_bytes(ACCOUNTS_KEY, doc, metadata={})
        with pytest.raises(AccountsCorrupt):
            await acc.verify("alice", PW)
    entry = {"role": "root", "disabled": False, "created_at": "", "changed_at": "", "hash": "$argon2id$x"}
    store.objects.clear()
    await store.put_bytes(
        ACCOUNTS_KEY, json.dumps({"version": 1, "users": {"a": entry}}).encode(), metadata={}
    )
    with pytest.raises(AccountsCorrupt, match="unknown role"):
        await acc.list()


class InterleavingStore(MemoryStore):
    """Two writers both read the document before either writes (the race a conditional write must win)."""

    def __init__(self, readers: int) -> None:
        super().__init__()
        self.readers = readers
        self.reads = 0
        self.all_read = asyncio.Event()

    async def get_bytes(self, key: str, **kw: Any) -> bytes | None:
        data = await super().get_bytes(key, **kw)
        if key == ACCOUNTS_KEY:
            self.reads += 1
            if self.reads >= self.readers:
                self.all_read.set()
        return data

    async def put_bytes_if(
        self, key: str, data: bytes, *, metadata: Mapping[str, str], **kw: Any
    ) -> PutResult:
        await asyncio.wait_for(self.all_read.wait(), 10)
        return await super().put_bytes_if(key, data, metadata=metadata, **kw)

    async def put_bytes(self, key: str, data: bytes, *, metadata: Mapping[str, str], **kw: Any) -> PutResult:
        await asyncio.wait_for(self.all_read.wait(), 10)
        return await super().put_bytes(key, data, metadata=metadata, **kw)


@pytest.mark.parametrize("existing", [False, True], ids=["first-document", "existing-document"])
async def test_concurrent_adds_from_two_admins_both_land(existing: bool) -> None:
    store = InterleavingStore(readers=2)
    if existing:
        seeded = MemoryStore()
        await accounts(seeded).add("root", Role.ADMIN, PW)
        store.objects = seeded.objects
    one, two = accounts(store), accounts(store)
    await asyncio.gather(one.add("bob", Role.VIEWER, PW), two.add("carol", Role.SUPERVISOR, PW))
    names = sorted(stored(store))
    assert names == (["bob", "carol", "root"] if existing else ["bob", "carol"])
    assert store.reads >= 3  # one of them lost the race, re-read and applied its change again


async def test_concurrent_demotions_keep_an_admin() -> None:
    """Two admins each demote the other at once: the second sees the first's change and is refused."""
    seeded = MemoryStore()
    seed = accounts(seeded)
    await seed.add("alice", Role.ADMIN, PW)
    await seed.add("bob", Role.ADMIN, PW)
    store = InterleavingStore(readers=2)
    store.objects = seeded.objects
    results = await asyncio.gather(
        accounts(store).set_role("alice", Role.VIEWER),
        accounts(store).set_role("bob", Role.VIEWER),
        return_exceptions=True,
    )
    assert sum(isinstance(r, LastAdminError) for r in results) == 1
    assert sum(1 for e in stored(store).values() if e["role"] == "admin") == 1


def test_policies_let_admins_write_the_console_read_and_retention_not_see_accounts() -> None:
    """What tests/test_policies_enforced.py checks on Ceph RGW, as documents (runs everywhere)."""
    users = "arn:aws:s3:::b1/users/*"

    def allowed(doc: dict[str, Any], action: str) -> set[str]:
        return {
            r
            for st in doc["Statement"]
            if st["Effect"] == "Allow" and action in st["Action"]
            for r in st["Resource"]
        }

    docs = policy_documents("b1")
    assert users in allowed(docs["admin"], "s3:GetObject") and users in allowed(docs["admin"], "s3:PutObject")
    assert users in allowed(docs["service"], "s3:GetObject")
    assert users not in allowed(docs["service"], "s3:PutObject")
    assert not any(
        "users/" in r for a in ("s3:GetObject", "s3:PutObject") for r in allowed(docs["retention"], a)
    )
    assert not any("users/" in r for r in allowed(docs["admin"], "s3:DeleteObjectVersion"))
