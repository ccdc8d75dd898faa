"""The training library under the shipped role policies on Ceph RGW (which enforces them): the admin key
makes, lists and plays clips; the service key (the console's, which viewers use) and the retention key can
read neither a clip nor its source link, and the retention key cannot delete a clip.

There is no S3 key per console role: the service key is what a viewer's session reads through, so "a
viewer key cannot read training/" is checked as "the service key cannot" (and the desk refuses the viewer
role before any request: tests/test_training.py)."""

from __future__ import annotations

import math
import struct
import wave
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from test_policies_enforced import Rgw, bucket, rgw  # noqa: F401 - fixtures

from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.evidence.desk import EvidenceDesk, Principal
from kasuhara_ari.storage import DeletionGuard, ObjectRef, StorageError
from kasuhara_ari.training.library import TrainingLibrary, clip_keys

from recordings_seed import seed

pytestmark = pytest.mark.integration


def tone_wav(seconds: float = 3.0) -> bytes:
    out = BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(
            b"".join(
                struct.pack("<hh", int(8000 * math.sin(i * 0.55)), int(8000 * math.sin(i * 1.02)))
                for i in range(int(seconds * 8000))
            )
        )
    return out.getvalue()


async def test_only_the_admin_key_reaches_the_training_library(rgw: Rgw, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    service, retention, admin = (rgw.store(r, bucket) for r in ("service", "retention", "admin"))
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    try:
        s = await seed(
            service, f"{int(started.timestamp())}.5", started, audio=tone_wav(), flags=["harassment"]
        )
        desk = EvidenceDesk(admin, MemoryEvents(), Principal("trainer", "admin"))
        library = TrainingLibrary(desk)
        # Failed before the admin policy named training/: the admin key's PUT was refused.
        clip = await library.add(s.call_id, 0.5, 2.0, title="rgw")
        keys = clip_keys(clip.clip_id)
        out = tmp_path / "c.wav"
        assert (await library.play(clip.clip_id, out)).sha256 == clip.sha256
        for key in keys:
            assert await admin.get_bytes(key) is not None
            for other in (service, retention):
                with pytest.raises(StorageError) as refused:
                    await other.get_bytes(key)
                assert refused.value.code == "AccessDenied", key
        refs = [
            ObjectRef(o.key, o.version_id) async for o in retention.list_prefix("training/", versions=True)
        ]
        assert len(refs) == 2
        outcome = await DeletionGuard(retention).delete(refs)
        assert not outcome.deleted and len(outcome.refused) == 2, outcome
        assert await admin.get_bytes(keys[0]) is not None
    finally:
        for store in (service, retention, admin):
            store.close()
