"""The console's local accounts: names, roles, argon2id password hashes, in the bucket.

One JSON document, ``users/accounts.json`` (``{"version": 1, "users": {name: entry}}``), read by the
console (``kasuhara web``, with the service's keys) and changed by admins (``kasuhara users``, with the
``[admin]`` keys). Why the bucket and not a file: the console and the admin CLI usually run on different
hosts, the bucket is already where access is decided per role (docs/s3-policies), and its object lock keeps
every earlier version of the document as history.

Every change is a read-modify-write with a conditional replace (``If-Match`` on the ETag read, or
``If-None-Match`` for the first document) retried on conflict, so two admins changing accounts at once never
lose each other's change (see :func:`~kasuhara_ari.storage.replace_if_unchanged` for Ceph RGW 16, which
refuses ``If-Match``: there the replace is not atomic).

Passwords: argon2id with explicit parameters (:data:`PASSWORD_PARAMETERS`: RFC 9106's second recommended
option, the "low memory" one, which is also argon2-cffi's default). A hash made with other parameters is
replaced at the next successful login (:meth:`Accounts.verify`). Passwords and hashes are never logged,
never in an :class:`Account`, never in an error message.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .safe import UnsafeValueError, safe_user_name
from .storage import (
    META_SHA256,
    USERS_PREFIX,
    ObjectStore,
    PreconditionFailed,
    StorageError,
    replace_if_unchanged,
)

log = logging.getLogger(__name__)

__all__ = [
    "ACCOUNTS_KEY",
    "PASSWORD_MAX_CHARS",
    "PASSWORD_MIN_CHARS",
    "PASSWORD_PARAMETERS",
    "Account",
    "AccountError",
    "AccountExists",
    "Accounts",
    "AccountsCorrupt",
    "LastAdminError",
    "Role",
    "UnknownAccount",
    "check_endpoint",
    "check_password",
    "check_user_name",
    "parse_role",
    "password_hasher",
    "role_at_least",
]

ACCOUNTS_KEY = f"{USERS_PREFIX}accounts.json"
DOCUMENT_VERSION = 1
PASSWORD_MIN_CHARS = 12
#: Far above any real passphrase; hashing megabytes per login attempt would be a cheap denial of service.
PASSWORD_MAX_CHARS = 1024
#: RFC 9106 section 4, second recommended option: argon2id, t=3, m=64 MiB, p=4, 16-byte salt, 32-byte
#: tag. Spelled out (not argon2-cffi's defaults by reference) so a library upgrade cannot change them
#: silently; changing them here rehashes each account at its next login.
PASSWORD_PARAMETERS: Mapping[str, int] = {
    "time_cost": 3,
    "memory_cost": 65536,
    "parallelism": 4,
    "hash_len": 32,
    "salt_len": 16,
}
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
WRITE_ATTEMPTS = 8


class Role(StrEnum):
    """What a console user may do: each role may do everything the ones below it may. (A ``str``:
    ``Role.ADMIN == "admin"``, and it is written to JSON and templates as its value.)"""

    VIEWER = "viewer"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 0, Role.SUPERVISOR: 1, Role.ADMIN: 2}


def role_at_least(role: Role, needed: Role) -> bool:
    """Whether ``role`` includes what ``needed`` may do (viewer < supervisor < admin)."""
    return _RANK[Role(role)] >= _RANK[Role(needed)]


class AccountError(ValueError):
    """A refused account change or bad input; the message says which and never shows a password."""


class UnknownAccount(AccountError):
    """No account with that name."""


class AccountExists(AccountError):
    """``add`` of a name that is taken."""


class LastAdminError(AccountError):
    """The change would leave no enabled admin: nobody could manage the console's users any more."""


class AccountsCorrupt(StorageError):
    """``users/accounts.json`` is not a document this code wrote: refused rather than guessed at."""


def parse_role(value: object) -> Role:
    """A role from text (CLI, document); :class:`AccountError` naming the allowed ones otherwise."""
    if isinstance(value, Role):
        return value
    try:
        if isinstance(value, str):
            return Role(value)
    except ValueError:
        pass
    shown = str(value)[:20]
    raise AccountError(f"unknown role {shown!r} (one of {', '.join(r.value for r in Role)})") from None


def check_user_name(name: object) -> str:
    """The name if it is a safe user name, else :class:`AccountError` (also an ``UnsafeValueError``
    message: it shows only a cleaned start of the value)."""
    try:
        return safe_user_name(name)
    except UnsafeValueError as exc:
        raise AccountError(str(exc)) from None


def check_password(name: str, password: object) -> str:
    """The password if acceptable for ``name``: 12 to 1024 characters, not the user name itself."""
    if not isinstance(password, str):
        raise AccountError("the password must be text")
    if len(password) < PASSWORD_MIN_CHARS:
        raise AccountError(f"the password is too short: at least {PASSWORD_MIN_CHARS} characters")
    if len(password) > PASSWORD_MAX_CHARS:
        raise AccountError(f"the password is too long: at most {PASSWORD_MAX_CHARS} characters")
    if password.strip().casefold() == name.casefold():
        raise AccountError("the password must not be the user name")
    return password


#: A phone the console may ring for this user (``kasuhara supervise --endpoint``): an Asterisk dial string
#: such as ``PJSIP/alice`` or ``PJSIP/sup/sip:sup@10.0.0.5:5060``; no commas, spaces or ``&`` (which would
#: split it into several destinations or arguments).
_ENDPOINT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}/[A-Za-z0-9][A-Za-z0-9._@:/+=;-]{0,199}")


def check_endpoint(value: object) -> str:
    """The supervisor's phone of an account (empty: none), or :class:`AccountError`."""
    if value == "":
        return ""
    if not isinstance(value, str) or not _ENDPOINT.fullmatch(value):
        shown = str(value)[:40].encode("ascii", "backslashreplace").decode()
        raise AccountError(
            f"not a phone endpoint {shown!r}: TECH/resource such as PJSIP/alice (letters, digits and "
            "._@:/+=;- only)"
        )
    return value


def password_hasher(**overrides: int) -> PasswordHasher:
    """argon2id with :data:`PASSWORD_PARAMETERS` (``overrides`` for tests and benchmarks only)."""
    p = {**PASSWORD_PARAMETERS, **overrides}
    return PasswordHasher(
        time_cost=p["time_cost"],
        memory_cost=p["memory_cost"],
        parallelism=p["parallelism"],
        hash_len=p["hash_len"],
        salt_len=p["salt_len"],
        type=Type.ID,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Account:
    """What the console and the CLI may know of a user: never the hash."""

    name: str
    role: Role
    disabled: bool
    created_at: str
    changed_at: str
    #: The phone the console rings when this user joins a call from the board ("" = the configured
    #: ``escalation.supervisors[0]``).
    endpoint: str = ""


@dataclass(frozen=True)
class _Entry:
    """One user as stored; the hash stays out of ``repr`` (tracebacks, debug logs)."""

    role: Role
    disabled: bool
    created_at: str
    changed_at: str
    hash: str = field(repr=False)
    endpoint: str = ""

    def account(self, name: str) -> Account:
        return Account(name, self.role, self.disabled, self.created_at, self.changed_at, self.endpoint)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "role": self.role.value,
            "disabled": self.disabled,
            "created_at": self.created_at,
            "changed_at": self.changed_at,
            "hash": self.hash,
        }
        if self.endpoint:
            doc["endpoint"] = self.endpoint  # absent in documents written before it existed
        return doc

    @classmethod
    def from_json(cls, name: str, doc: object) -> _Entry:
        if not isinstance(doc, dict):
            raise AccountsCorrupt(f"{ACCOUNTS_KEY}: user {name!r} is not an object")
        try:
            role = Role(str(doc.get("role")))
        except ValueError:
            raise AccountsCorrupt(f"{ACCOUNTS_KEY}: user {name!r} has an unknown role") from None
        disabled, created, changed, hashed = (
            doc.get("disabled"),
            doc.get("created_at"),
            doc.get("changed_at"),
            doc.get("hash"),
        )
        if not isinstance(disabled, bool) or not isinstance(created, str) or not isinstance(changed, str):
            raise AccountsCorrupt(f"{ACCOUNTS_KEY}: user {name!r} lacks disabled/created_at/changed_at")
        if not isinstance(hashed, str) or not hashed.startswith("$argon2id$"):
            raise AccountsCorrupt(f"{ACCOUNTS_KEY}: user {name!r} has no argon2id hash")
        try:
            endpoint = check_endpoint(doc.get("endpoint", ""))
        except AccountError:
            raise AccountsCorrupt(f"{ACCOUNTS_KEY}: user {name!r} has an unusable endpoint") from None
        return cls(role, disabled, created[:64], changed[:64], hashed, endpoint)


def _parse(data: bytes | None) -> dict[str, _Entry]:
    """The users of a stored document; ``None`` (no document yet) is no users."""
    if data is None:
        return {}
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise AccountsCorrupt(f"{ACCOUNTS_KEY} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != DOCUMENT_VERSION:
        raise AccountsCorrupt(f"{ACCOUNTS_KEY} is not a version {DOCUMENT_VERSION} accounts document")
    users = doc.get("users")
    if not isinstance(users, dict):
        raise AccountsCorrupt(f"{ACCOUNTS_KEY} has no users object")
    out: dict[str, _Entry] = {}
    for name, entry in users.items():
        try:
            safe_user_name(name)
        except UnsafeValueError:
            raise AccountsCorrupt(f"{ACCOUNTS_KEY} holds an unsafe user name") from None
        out[name] = _Entry.from_json(name, entry)
    return out


def _serialise(users: Mapping[str, _Entry]) -> bytes:
    doc = {"version": DOCUMENT_VERSION, "users": {n: users[n].to_json() for n in sorted(users)}}
    return json.dumps(doc, indent=1, ensure_ascii=True).encode("ascii")


def _enabled_admins(users: Mapping[str, _Entry]) -> set[str]:
    return {n for n, e in users.items() if e.role is Role.ADMIN and not e.disabled}


def _keeps_an_admin(users: Mapping[str, _Entry], name: str, new: _Entry) -> None:
    """Refuse a change that removes the last enabled admin (nobody could manage users in the console)."""
    before = _enabled_admins(users)
    after = _enabled_admins({**users, name: new})
    if before and not after:
        raise LastAdminError(f"refused: {name!r} is the last enabled admin; make another user admin first")


#: What a change does to the current users: the new entry for the name, or ``None`` for "nothing to do".
Change = Callable[[Mapping[str, _Entry]], _Entry | None]


class Accounts:
    """The accounts document of one bucket: look-ups, password checks, and admin changes.

    The sync ``minio`` client runs in the store's threads and argon2 in ``asyncio.to_thread``: nothing
    here blocks the event loop (a hash takes about 0.1 s of CPU by design)."""

    def __init__(self, store: ObjectStore, *, hasher: PasswordHasher | None = None) -> None:
        self.store = store
        self.hasher = hasher or password_hasher()
        self._dummy: str | None = None

    # -- reads

    async def _users(self) -> dict[str, _Entry]:
        return _parse(await self.store.get_bytes(ACCOUNTS_KEY, max_bytes=MAX_DOCUMENT_BYTES))

    async def get(self, name: str) -> Account | None:
        """The account, or ``None`` for an unknown (or unsafe) name."""
        try:
            safe_user_name(name)
        except UnsafeValueError:
            return None
        entry = (await self._users()).get(name)
        return entry.account(name) if entry is not None else None

    async def list(self) -> builtins.list[Account]:
        """Every account, by name."""
        users = await self._users()
        return [users[n].account(n) for n in sorted(users)]

    async def verify(self, name: str, password: str) -> Account | None:
        """The account if ``password`` is right and the account enabled; ``None`` otherwise, in about
        the same time whether the name exists or not (a dummy hash is checked for unknown names).

        Rehashes a hash made with older parameters; a store that refuses the write (the console's keys
        may only read) leaves the old hash, which still works."""
        known = False
        entry: _Entry | None = None
        try:
            safe_user_name(name)
            known = True
        except UnsafeValueError:
            pass
        if known:
            entry = (await self._users()).get(name)
        if not isinstance(password, str) or len(password) > PASSWORD_MAX_CHARS:
            password, entry = "", None
        if entry is None:
            await asyncio.to_thread(self._check, await self._dummy_hash(), password)
            return None
        if not await asyncio.to_thread(self._check, entry.hash, password) or entry.disabled:
            return None
        if self.hasher.check_needs_rehash(entry.hash):
            await self._rehash(name, entry, password)
        return entry.account(name)

    def _check(self, hashed: str, password: str) -> bool:
        try:
            return self.hasher.verify(hashed, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = await asyncio.to_thread(self.hasher.hash, secrets.token_urlsafe(24))
        return self._dummy

    async def _rehash(self, name: str, seen: _Entry, password: str) -> None:
        new_hash = await asyncio.to_thread(self.hasher.hash, password)

        def change(users: Mapping[str, _Entry]) -> _Entry | None:
            current = users.get(name)
            if current is None or current.hash != seen.hash:
                return None  # deleted, or changed meanwhile (a new password): leave it
            return replace(current, hash=new_hash)

        try:
            await self._change(name, change)
        except StorageError as exc:
            log.warning("accounts event=rehash_skipped user=%s why=%s", name, type(exc).__name__)
        else:
            log.info("accounts event=rehashed user=%s", name)

    # -- changes

    async def add(self, name: str, role: Role, password: str, *, endpoint: str = "") -> Account:
        """Create an account; :class:`AccountExists` if the name is taken."""
        name = check_user_name(name)
        role = parse_role(role)
        endpoint = check_endpoint(endpoint)
        check_password(name, password)
        hashed = await asyncio.to_thread(self.hasher.hash, password)
        now = _now()
        new = _Entry(role, False, now, now, hashed, endpoint)

        def change(users: Mapping[str, _Entry]) -> _Entry | None:
            if name in users:
                raise AccountExists(f"user {name!r} exists already")
            return new

        await self._change(name, change)
        return new.account(name)

    async def set_password(self, name: str, password: str) -> None:
        name = check_user_name(name)
        check_password(name, password)
        hashed = await asyncio.to_thread(self.hasher.hash, password)
        await self._change(
            name, lambda users: replace(self._known(users, name), hash=hashed, changed_at=_now())
        )

    async def set_role(self, name: str, role: Role) -> None:
        """Change a user's role (no write when it is that role already); never demotes the last admin."""
        name = check_user_name(name)
        role = parse_role(role)

        def change(users: Mapping[str, _Entry]) -> _Entry | None:
            current = self._known(users, name)
            if current.role is role:
                return None
            new = replace(current, role=role, changed_at=_now())
            _keeps_an_admin(users, name, new)
            return new

        await self._change(name, change)

    async def set_endpoint(self, name: str, endpoint: str) -> None:
        """Set (or clear, with "") the phone the console rings for this user."""
        name = check_user_name(name)
        endpoint = check_endpoint(endpoint)

        def change(users: Mapping[str, _Entry]) -> _Entry | None:
            current = self._known(users, name)
            if current.endpoint == endpoint:
                return None
            return replace(current, endpoint=endpoint, changed_at=_now())

        await self._change(name, change)

    async def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (the console refuses the user at its next request) or enable an account; never
        disables the last enabled admin."""
        name = check_user_name(name)

        def change(users: Mapping[str, _Entry]) -> _Entry | None:
            current = self._known(users, name)
            if current.disabled is disabled:
                return None
            new = replace(current, disabled=disabled, changed_at=_now())
            _keeps_an_admin(users, name, new)
            return new

        await self._change(name, change)

    @staticmethod
    def _known(users: Mapping[str, _Entry], name: str) -> _Entry:
        entry = users.get(name)
        if entry is None:
            raise UnknownAccount(f"no user {name!r}")
        return entry

    async def _change(self, name: str, change: Change) -> None:
        """Read, apply ``change`` to ``name``'s entry, write back only if nobody wrote meanwhile; on a
        conflict start again from what the other writer left (``change`` decides again: an admin check
        sees the other change)."""
        for attempt in range(WRITE_ATTEMPTS):
            info = await self.store.stat(ACCOUNTS_KEY)
            # stat before get: a document newer than the ETag read makes the conditional write fail
            # (and retry), never succeed over a change this run did not see.
            data = await self.store.get_bytes(ACCOUNTS_KEY, max_bytes=MAX_DOCUMENT_BYTES)
            if (info is None) != (data is None):
                continue  # created or deleted between the two reads
            users = _parse(data)
            new = change(users)
            if new is None:
                return
            payload = _serialise({**users, name: new})
            meta = {META_SHA256: hashlib.sha256(payload).hexdigest()}
            try:
                if info is None:
                    await self.store.put_bytes_if(ACCOUNTS_KEY, payload, metadata=meta, if_none_match=True)
                else:
                    await replace_if_unchanged(
                        self.store,
                        ACCOUNTS_KEY,
                        payload,
                        metadata=meta,
                        etag=info.etag,
                        version_id=info.version_id,
                        what="accounts",
                    )
            except PreconditionFailed:
                log.info("accounts event=write_conflict user=%s attempt=%d", name, attempt + 1)
                await asyncio.sleep(0.05 * (attempt + 1) * (1 + secrets.randbelow(100) / 100))
                continue
            return
        raise PreconditionFailed(
            f"{ACCOUNTS_KEY}: changed by someone else {WRITE_ATTEMPTS} times in a row; try again"
        )
