"""A subscriber verifies only digests it knows: a manifest naming another checksum algorithm is
refused before anything is allocated or fetched."""

from __future__ import annotations

import pytest

from schemas.manifest import BucketSpec, FrameLocator, Manifest, RegionSpec, TensorSpec
from streamer.checksum import ALGORITHM
from streamer.errors import TransportError
from subscribers.pull import pull
from subscribers.staging import Staging


def manifest_with(algorithm: str) -> Manifest:
    return Manifest(
        model="m",
        version=3,
        regions=(
            RegionSpec(nbytes=256, locators=(FrameLocator(endpoint="tcp://127.0.0.1:1", key="k"),)),
        ),
        tensors=(
            TensorSpec(name="w", dtype="float32", shape=(64,), region=0, offset=0, nbytes=256),
        ),
        buckets=(BucketSpec(region=0, offset=0, nbytes=256, checksum="0" * 32),),
        checksum_algorithm=algorithm,
    )


@pytest.mark.parametrize("algorithm", ["wsum64", "crc32c", ""])
async def test_a_manifest_with_an_unknown_checksum_algorithm_is_refused_before_allocation(
    algorithm: str,
) -> None:
    staging = Staging(receivers=[], pin_memory=False)
    with pytest.raises(TransportError, match=rf"checksum algorithm '{algorithm}'.*'{ALGORITHM}'"):
        await pull(manifest_with(algorithm), staging, [])
    assert staging.buffer.numel() == 0  # nothing was allocated for it
