"""What the fault tests measure of a running process: resident memory and CPU time."""

from __future__ import annotations

import os
import socket
from typing import Any

import aiohttp

__all__ = ["cpu_s", "free_port", "model_page", "rss_bytes"]


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid`, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds `pid` has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def model_page(http: str, model: str) -> dict[str, Any] | None:
    """GET /v1/models/{model}, or None while the broker does not know it yet."""
    timeout = aiohttp.ClientTimeout(total=5)
    url = f"{http}/v1/models/{model}"
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        if response.status == 404:
            return None
        assert response.status == 200, (url, response.status, await response.text())
        page: dict[str, Any] = await response.json()
        return page
