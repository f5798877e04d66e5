"""A version's manifest is encoded once, at its announcement: the same bytes are announced by
digest, served to FetchManifest, written to the state file, and digested again after a restart."""

from __future__ import annotations

import hashlib

import msgspec

from schemas.codec import encode
from streamer.registry import Registry, _Persisted, _PersistedPending, _PersistedVersion
from tests.streamer.test_announced import shard

MODEL = "org/model"


def test_the_state_file_holds_the_announced_bytes_and_a_restart_keeps_the_digest() -> None:
    reg = Registry(retention=2)
    reg.hello("pub", "publisher", "host", 1, now=0.0)
    reg.hello("sub", "subscriber", "host", 2, now=0.0)
    reg.subscribe("sub", MODEL)
    for version in (1, 2):
        reg.publish("pub", MODEL, version, 0, 1, shard(1000), now=0.0)
    reg.publish("pub", MODEL, 3, 0, 2, shard(10), now=0.0)  # one rank of two: pending
    record = reg.models[MODEL].versions[2]
    assert record.body == encode(record.manifest)
    assert record.digest == hashlib.sha256(record.body).hexdigest()
    assert reg.manifest_body("sub", MODEL, 2, record.digest) is record.body

    saved = reg.snapshot()

    # Byte for byte what encoding every manifest again would write.
    model = reg.models[MODEL]
    again = _Persisted(
        versions=[
            _PersistedVersion(
                manifest=r.manifest,
                publishers=sorted(r.publishers),
                retiring=r.retiring,
                leases=dict(r.leases),
            )
            for r in model.versions.values()
        ],
        history={MODEL: model.history},
        pending=[
            _PersistedPending(
                model=MODEL,
                version=3,
                world_size=2,
                shards=model.pending[3].shards,
                publishers=["pub"],
                job="",
                first_peer="pub",
            )
        ],
    )
    assert saved == msgspec.msgpack.encode(again)
    restored = Registry(retention=2)
    restored.restore(saved, now=1.0)
    assert restored.models[MODEL].versions[2].digest == record.digest
    assert restored.models[MODEL].versions[2].body == record.body
    assert sorted(restored.models[MODEL].pending) == [3]
