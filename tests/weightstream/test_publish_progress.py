"""`weightstream publish --checkpoint` shows packing on one updating line on a TTY, and writes
nothing of it when stderr is a file (the INFO lines say it once)."""

from __future__ import annotations

import asyncio
import os
import pty
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.e2e.procs import ENV, Fleet, start_broker

pytestmark = pytest.mark.slow


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_publish_shows_packing_on_a_terminal_only(fleet: Fleet, tmp_path: Path):
    checkpoint = tmp_path / "model.safetensors"
    tensors = {f"layers.{i}.weight": torch.full((256, 256), float(i)) for i in range(3)}
    save_file(tensors, str(checkpoint))
    broker = await start_broker(fleet)
    args = ["publish", "--broker", broker.endpoint, "--model", "m", "--checkpoint"]
    args += [str(checkpoint), "--exit", "--version"]

    # On a terminal: one line rewritten in place, ended once.
    master, slave = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "weightstream", *args, "1"],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=slave,
            env=ENV,
        )
        os.close(slave)
        slave = -1
        screen = (await asyncio.wait_for(asyncio.to_thread(_read_all, master), 60)).decode()
        assert await asyncio.wait_for(process.wait(), 30) == 0, screen
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    line = "v1: packing 3 tensors, 786.4 kB:"
    assert f"\r{line} 0 s" in screen, screen
    assert f"\r{line} published in " in screen, screen

    # Not a terminal: the log has the INFO line, no progress.
    quiet = await fleet.start("quiet", *args, "2")
    assert await asyncio.wait_for(quiet.process.wait(), 60) == 0, quiet.tail()
    log = quiet.log.read_text()
    assert "version=2 size=786.4kB tensors=3 published" in log, log
    assert "packing" not in log
