"""The retention lease under the shipped retention policy, on the stack's Ceph RGW which enforces it."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

import pytest
from test_policies_enforced import Rgw, bucket, rgw  # noqa: F401  (fixtures)

from kasuhara_ari.lease import Lease, LeaseLost
from kasuhara_ari.retention import LEASE_PREFIX

pytestmark = pytest.mark.integration


async def test_the_retention_role_can_hold_check_and_take_over_the_lease_on_rgw(
    rgw: Rgw,  # noqa: F811
    bucket: str,  # noqa: F811
) -> None:
    """Under the shipped retention policy on a server that enforces it (RGW): the retention key may list,
    create, read (by version) and renew the lease objects. The policy grants ``s3:GetObjectVersion`` on
    ``retention/*`` because AWS requires it for a GET by version id; RGW 16 let it pass without."""
    stores = [rgw.store("retention", bucket) for _ in range(3)]
    try:
        a, b = (
            Lease(
                s,
                LEASE_PREFIX,
                owner={"node": n, "pid": os.getpid()},
                ttl_s=300,
                skew_s=10,
                hostname=f"host-{n}",
            )
            for s, n in zip(stores, ("a", "b"), strict=False)
        )
        won = await asyncio.gather(a.acquire(), b.acquire())
        assert sorted(won) == [False, True]
        holder, other = (a, b) if won[0] else (b, a)
        assert await holder.check() == 1
        await holder.renew()
        late = Lease(
            stores[2],
            LEASE_PREFIX,
            owner={"node": "c", "pid": os.getpid()},
            ttl_s=300,
            skew_s=10,
            hostname="host-c",
            clock=lambda: datetime.now(UTC) + timedelta(hours=1),
        )
        assert await late.acquire() and late.token == 2
        with pytest.raises(LeaseLost, match="taken over"):
            await holder.check()
        assert other.token is None
    finally:
        for s in stores:
            s.close()
