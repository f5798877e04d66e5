"""`weightstream status` shows pending versions with their missing ranks, unreadable and
expired versions, staged subscribers, and says when there are more rows than it shows."""

from __future__ import annotations

from weightstream.status import render_status


def test_status_shows_pending_unreadable_and_expired_versions_and_staged_rows() -> None:
    model = {
        "model": "llama",
        "latest": 4,
        "readable_versions": [],
        "latest_bytes": None,
        "latest_announced_at": None,
        "subscribers_at_latest": 0,
        "pending": [{"version": 5, "missing_ranks": [1, 3]}],
        "withdrawn": [{"version": 4, "reason": "publisher rank0 is gone"}],
        "expired": [{"version": 2, "missing_ranks": [1]}],
    }
    row = {
        "peer_id": "subscriber-h-1-abc",
        "name": "node-7",
        "model": "llama",
        "state": "staged",
        "applied_version": 3,
        "lag": 1,
        "progress": 1.0,
        "pulling_version": 4,
        "bytes_per_s": 1e9,
        "last_pull_s": None,
        "last_pause_s": None,
        "last_error": None,
        "manifest_source": "peer:node-3",
    }
    text = render_status({"models": [model], "subscribers": [row], "subscribers_total": 3})

    assert "v5 missing 1,3" in text
    assert "v4 unreadable (publisher rank0 is gone)" in text
    assert "v2 expired, ranks 1 missing" in text
    [line] = [line for line in text.splitlines() if line.startswith("node-7")]
    assert "staged" in line.split()
    assert "node-3" in line.split()  # the manifest's source, without "peer:"
    assert "(2 more subscriber rows: GET /v1/subscribers?offset=1)" in text
