"""A shared-memory filesystem too small for a version fails up front, with the size and the fix.

Before, the segment was only `ftruncate`d: a tmpfs without room (Docker's /dev/shm is 64 MiB
by default) let the mapping succeed, and the first write to a page it could not supply killed
the trainer or the vLLM server with SIGBUS. A real 8 MiB tmpfs is mounted for the test.
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

import pytest

from publishers.memory import BufferPool
from schemas.manifest import Manifest, RegionSpec
from streamer.transport.shm import SharedMemoryFull
from subscribers.staging import Staging

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")

SMALL = 8 << 20


@pytest.fixture
def small_shm(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "shm"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # mappings may outlive it


def _manifest(nbytes: int) -> Manifest:
    return Manifest(
        model="m",
        version=1,
        regions=(RegionSpec(nbytes=nbytes, locators=()),),
        tensors=(),
        buckets=(),
    )


def test_publisher_shm_too_small_fails_with_the_size_and_the_fix(small_shm: Path) -> None:
    pool = BufferPool(pin_memory=False, shm_prefix="weightstream-test", shm_dir=small_shm)
    buffers, _ = pool.take((4 << 20,))  # fits
    assert buffers.nbytes == 4 << 20
    with pytest.raises(SharedMemoryFull) as failed:
        pool.take((16 << 20,))
    message = str(failed.value)
    assert f"no room for {16 << 20} bytes" in message
    assert "--shm-size=" in message
    assert sorted(p.name for p in small_shm.iterdir()) == ["weightstream-test-0"], (
        "the refused segment is removed"
    )
    pool.close()


def test_subscriber_staging_too_small_fails_with_the_size_and_the_fix(small_shm: Path) -> None:
    staging = Staging(receivers=[], pin_memory=False, shm_name="staging-test", shm_dir=small_shm)
    staging.prepare(_manifest(2 << 20))
    assert staging.buffer.numel() == 2 << 20
    staging.buffer.fill_(7)  # reserved: writing every page succeeds
    with pytest.raises(SharedMemoryFull, match=r"--shm-size=\d+m"):
        staging.prepare(_manifest(32 << 20))
    staging.close()
    assert list(small_shm.iterdir()) == []
