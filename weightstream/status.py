"""`weightstream status`: the broker's view of models and subscribers, as a table or JSON.

With relays, each subscriber row also says where it reads each stripe from (READS FROM: one
name per stripe, `trainer` for the trainer) and how many bytes others verified from it (SERVED).
MANIFEST says where it took the applied version's manifest: `broker`, a relay peer's name, or
`-` (not known: an older subscriber or broker).
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

__all__ = ["fetch_status", "render_status"]

_ROWS = 1000
"""Subscriber rows fetched; the table says how many more there are."""


async def fetch_status(
    http_url: str, *, timeout_s: float = 5.0, min_lag: int | None = None
) -> dict[str, Any]:
    """Models and subscribers from the broker's status endpoint; OSError saying what to do.

    `min_lag`: only subscribers at least that many versions behind their model's newest."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    query = f"limit={_ROWS}" + (f"&min_lag={min_lag}" if min_lag is not None else "")
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{http_url}/v1/models") as response:
                response.raise_for_status()
                models = await response.json()
            async with session.get(f"{http_url}/v1/subscribers?{query}") as response:
                response.raise_for_status()
                subscribers = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OSError(
            f"no weightstream status endpoint answered at {http_url} ({str(exc) or type(exc).__name__}): "
            "is the broker running? Pass its URL with --http or WEIGHTSTREAM_HTTP"
        ) from exc
    return {
        "models": models["models"],
        "subscribers": subscribers["subscribers"],
        "subscribers_total": subscribers.get("total", len(subscribers["subscribers"])),
    }


def _size(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
        nbytes /= 1000
    return "-"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(lines)


def _pending(model: dict[str, Any]) -> str:
    """`v5 missing 1,3` per version waiting for ranks."""
    parts = [
        f"v{p['version']} missing {','.join(map(str, p['missing_ranks']))}"
        for p in model.get("pending", [])
    ]
    return "; ".join(parts) or "-"


def _problems(model: dict[str, Any]) -> str:
    """Versions nobody can read, and pending versions that expired (newest of each)."""
    parts = [f"v{w['version']} unreadable ({w['reason']})" for w in model.get("withdrawn", [])[-1:]]
    parts += [
        f"v{e['version']} expired, ranks {','.join(map(str, e['missing_ranks']))} missing"
        for e in model.get("expired", [])[-1:]
    ]
    return "; ".join(parts)[:80]


def _reads_from(parents: list[str] | None) -> str:
    """`a,trainer` per stripe; `trainer` once when every stripe comes from it."""
    if not parents:
        return "-"
    if all(p == "trainer" for p in parents):
        return "trainer"
    return ",".join(parents)[:40]


def _manifest_source(source: str | None) -> str:
    """ "broker", the peer's name (of "peer:<name>", cut to 24), or "-" when not known."""
    if not source:
        return "-"
    return source.removeprefix("peer:")[:24]


def render_status(status: dict[str, Any]) -> str:
    """Two tables: models, then subscribers."""
    now = time.time()
    model_rows = [
        [
            m["model"],
            str(m["latest"]),
            ",".join(map(str, m["readable_versions"])) or "-",
            _size(m["latest_bytes"]),
            f"{now - m['latest_announced_at']:.0f}s ago" if m["latest_announced_at"] else "-",
            str(m["subscribers_at_latest"]),
            _pending(m),
            _problems(m),
        ]
        for m in status["models"]
    ]
    sub_rows = []
    for s in status["subscribers"]:
        progress = "-"
        if s["progress"] is not None:
            progress = (
                f"v{s['pulling_version']} {s['progress'] * 100:.0f}% {_size(s['bytes_per_s'])}/s"
            )
        sub_rows.append(
            [
                s.get("name") or s["peer_id"],
                s["model"],
                s["state"],
                "-" if s["applied_version"] is None else str(s["applied_version"]),
                "-" if s["lag"] is None else str(s["lag"]),
                progress,
                "-" if s["last_pull_s"] is None else f"{s['last_pull_s']:.2f}s",
                "-" if s["last_pause_s"] is None else f"{s['last_pause_s'] * 1e3:.1f}ms",
                _manifest_source(s.get("manifest_source")),
                _reads_from(s.get("reads_from")),
                _size(s["served_bytes"])
                if s.get("relay_endpoint") or s.get("served_bytes")
                else "-",
                (s["last_error"] or "")[:60],
            ]
        )
    shown, total = len(status["subscribers"]), status.get("subscribers_total", 0)
    more = [f"({total - shown} more subscriber rows: GET /v1/subscribers?offset={shown})"]
    return "\n\n".join(
        [
            _table(
                [
                    "MODEL",
                    "LATEST",
                    "READABLE",
                    "SIZE",
                    "ANNOUNCED",
                    "AT LATEST",
                    "PENDING",
                    "PROBLEMS",
                ],
                model_rows,
            ),
            _table(
                [
                    "SUBSCRIBER",
                    "MODEL",
                    "STATE",
                    "VERSION",
                    "LAG",
                    "PULLING",
                    "LAST PULL",
                    "PAUSE",
                    "MANIFEST",
                    "READS FROM",
                    "SERVED",
                    "LAST ERROR",
                ],
                sub_rows,
            ),
            *(more if total > shown else []),
        ]
    )
