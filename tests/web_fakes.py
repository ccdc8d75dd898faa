"""Fakes for the console's tests: accounts in memory (same API as kasuhara_ari.accounts.Accounts) and a
clock the test moves by hand."""

from __future__ import annotations

import dataclasses
import hmac

from kasuhara_ari.accounts import Account, Role


class FakeAccounts:
    """Accounts with plain passwords in a dict: pure logic only, never a stand-in for S3."""

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}
        self._passwords: dict[str, str] = {}
        self.verify_calls = 0
        #: Set to make every read fail, as the real store does while S3 is away.
        self.broken = False

    def add(self, name: str, role: Role, password: str) -> Account:
        account = Account(name, role, False, "2026-12-01T00:00:00Z", "2026-12-01T00:00:00Z")
        self._accounts[name] = account
        self._passwords[name] = password
        return account

    def set_disabled(self, name: str, disabled: bool) -> None:
        self._accounts[name] = dataclasses.replace(self._accounts[name], disabled=disabled)

    def set_role(self, name: str, role: Role) -> None:
        self._accounts[name] = dataclasses.replace(self._accounts[name], role=role)

    async def get(self, name: str) -> Account | None:
        if self.broken:
            raise ConnectionError("accounts store unavailable")
        return self._accounts.get(name)

    async def list(self) -> list[Account]:
        return sorted(self._accounts.values(), key=lambda a: a.name)

    async def verify(self, name: str, password: str) -> Account | None:
        self.verify_calls += 1
        if self.broken:
            raise ConnectionError("accounts store unavailable")
        account = self._accounts.get(name)
        if account is None or account.disabled:
            return None
        if not hmac.compare_digest(self._passwords[name].encode(), password.encode()):
            return None
        return account


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
