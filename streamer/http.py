"""The HTTP status endpoint: version queries and the fleet, read from the broker's registry.

    GET /healthz                                  {"status": "ok", uptime, state file health}
    GET /v1/models                                every model: latest, readable, pending,
                                                  expired and unreadable versions
    GET /v1/models/{model}                        the same, and history
    GET /v1/models/{model}/versions/{version}     manifest summary (tensors, buckets, bytes),
                                                  and its relay: who reads each stripe from
                                                  whom, per-node rates, bytes each holder served
    GET /v1/subscribers?limit=&offset=&model=&state=&min_lag=
                                                  each subscriber: version, lag, progress, rate
                                                  (a page: at most 1000 rows by default;
                                                  min_lag=N: only those N or more versions
                                                  behind the newest)
    GET /metrics                                  Prometheus text (prometheus-client)
    POST /v1/models/{model}/versions/{version}/retire   admin: stop serving a version
    DELETE /v1/models/{model}                     admin: forget a model

Model names may contain slashes (`org/name`); the routes match them greedily. Handlers run
on the broker's event loop: each renders a bounded amount (capped rows, a page of
subscribers) so that no request stalls the ZeroMQ loop; idle and slow connections are closed
after `idle_timeout_s`.

Routes that change state need `Authorization: Bearer <admin token>` (`http_admin_token_file`;
without one they are off). With `http_read_token_file` the read routes need that token (or
the admin one), all but /healthz. Tokens are compared in constant time and never echoed.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from aiohttp import web

from streamer.errors import BrokerError
from streamer.metrics import CONTENT_TYPE, BrokerStats, render_off_loop

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Generator

    from streamer.registry import Outbox, PeerState, Registry, VersionRecord

__all__ = ["AdminActions", "build_app", "fleet", "fleet_async", "relay_status", "serve_http"]

logger = logging.getLogger(__name__)

_json = msgspec.json.Encoder()

DEFAULT_PAGE = 1000
MAX_PAGE = 10_000
_MAX_TENSOR_ROWS = 10_000
_MAX_RELAY_ROWS = 1000
_STATES = ("idle", "pulling", "staged", "gone")
_MAX_LAG = 2**63 - 1


class AdminActions(Protocol):
    """What the admin routes ask of the broker (`streamer.broker.Broker` is one)."""

    def retire_version(self, model: str, version: int, *, by: str) -> Outbox: ...
    def delete_model(self, model: str, *, by: str) -> Outbox: ...
    def defer(self, outbox: Outbox) -> None: ...


def _bearer(request: web.Request, *tokens: str | None) -> bool:
    """Does the request carry one of `tokens` (constant-time comparison)?"""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return any(
        token is not None and hmac.compare_digest(given.strip().encode(), token.encode())
        for token in tokens
    )


def _unauthorized(detail: str) -> web.Response:
    response = _respond({"error": "unauthorized", "detail": detail}, status=401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="weightstream"'
    return response


def _respond(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def _not_found(detail: str) -> web.Response:
    return _respond({"error": "not_found", "detail": detail}, status=404)


def model_summary(registry: Registry, name: str, now: float) -> dict[str, Any]:
    model = registry.models[name]
    readable = sorted(v for v, r in model.versions.items() if not r.retiring)
    latest = model.versions.get(model.latest) if model.latest is not None else None
    return {
        "model": name,
        "latest": model.latest,
        "readable_versions": readable,
        "latest_bytes": latest.manifest.total_bytes if latest else None,
        "latest_announced_at": latest.announced_at if latest else None,
        "subscribers_at_latest": registry.count_applied(name, model.latest)
        if model.latest is not None
        else 0,
        "pending": [
            {
                "version": version,
                "world_size": p.world_size,
                "ranks_in": sorted(p.shards),
                "missing_ranks": p.missing(),
                "age_s": round(now - p.started_at, 3),
            }
            for version, p in sorted(model.pending.items())
        ],
        "expired": list(model.expired),
        "unreadable": [
            {"version": v, "reason": r.unreadable}
            for v, r in sorted(model.versions.items())
            if r.unreadable is not None
        ],
        "withdrawn": list(model.withdrawn),
    }


_SCAN_STEP = 2000
"""Subscribers a status scan reads before it lets the event loop run (`fleet_async`)."""


def fleet(
    registry: Registry,
    now: float,
    *,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
    model: str | None = None,
    state: str | None = None,
    min_lag: int | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """One row per subscriber and model it follows, by peer id: (rows in all, this page).

    `min_lag`: only rows at least that many versions behind their model's newest (a
    subscriber that has applied nothing yet is behind any). One pass over the subscribers
    (kept sorted by the registry) that renders only the rows of the page: 15-25 ms at 10,000
    subscribers (bench/RESULTS_FLEET.md).
    """
    page: list[dict[str, Any]] = []
    scan = _scan(registry, now, page, limit, offset, model, state, min_lag)
    while True:
        try:
            next(scan)
        except StopIteration as done:
            return done.value, page


async def fleet_async(
    registry: Registry,
    now: float,
    *,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
    model: str | None = None,
    state: str | None = None,
    min_lag: int | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """`fleet`, letting the event loop run every `_SCAN_STEP` subscribers: a page of a large
    fleet does not hold up the broker's ZeroMQ loop for the whole scan (the HTTP route's)."""
    page: list[dict[str, Any]] = []
    scan = _scan(registry, now, page, limit, offset, model, state, min_lag)
    while True:
        try:
            next(scan)
        except StopIteration as done:
            return done.value, page
        await asyncio.sleep(0)


def _scan(
    registry: Registry,
    now: float,
    page: list[dict[str, Any]],
    limit: int,
    offset: int,
    model: str | None,
    state: str | None,
    min_lag: int | None,
) -> Generator[None, None, int]:
    """Fill `page`, pausing (yield) every `_SCAN_STEP` subscribers; returns the total. The
    id list is the registry's snapshot (replaced, never changed, as peers come and go), and a
    peer forgotten during a pause is skipped."""
    total = 0
    latest = {name: m.latest for name, m in registry.models.items()}
    unfiltered = state is None and min_lag is None
    for index, peer_id in enumerate(registry.subscriber_ids()):
        if index and index % _SCAN_STEP == 0:
            yield
        peer = registry.peers.get(peer_id)
        if peer is None:
            continue
        if model is not None:
            names: Collection[str] = (
                (model,) if model in peer.subscriptions or model in peer.applied else ()
            )
        elif len(peer.subscriptions) == 1 and peer.applied.keys() <= peer.subscriptions:
            names = peer.subscriptions
        else:
            names = sorted(peer.subscriptions | peer.applied.keys())
        if unfiltered and (total + len(names) <= offset or total >= offset + limit):
            total += len(names)  # rows outside the page: counted, not looked at
            continue
        for name in names:
            if state is not None and _state(peer, name) != state:
                continue
            if min_lag is not None and not _behind(
                latest.get(name), peer.applied.get(name), min_lag
            ):
                continue
            if offset <= total < offset + limit:
                page.append(_subscriber_row(registry, peer, name, now))
            total += 1
    return total


def _behind(latest: int | None, applied: int | None, min_lag: int) -> bool:
    if latest is None:
        return False
    return applied is None or latest - applied >= min_lag


def _state(peer: PeerState, name: str) -> str:
    if peer.gone:
        return "gone"
    progress = peer.progress.get(name)
    return progress.state if progress else "idle"


def _subscriber_row(registry: Registry, peer: PeerState, name: str, now: float) -> dict[str, Any]:
    model = registry.models.get(name)
    latest = model.latest if model else None
    applied = peer.applied.get(name)
    lag = None if latest is None or applied is None else latest - applied
    progress = peer.progress.get(name)
    return {
        "peer_id": peer.peer_id,
        "name": peer.name,
        "host": peer.host,
        "pid": peer.pid,
        "state": _state(peer, name),
        "model": name,
        "applied_version": applied,
        "latest_version": latest,
        "lag": lag,
        "pulling_version": progress.version if progress else None,
        "progress": round(progress.bytes_done / progress.bytes_total, 4)
        if progress and progress.bytes_total
        else None,
        "bytes_per_s": progress.bytes_per_s if progress else None,
        "last_pull_s": peer.last_pull_s.get(name),
        "last_pause_s": peer.last_pause_s.get(name),
        "last_heartbeat_age_s": round(now - peer.last_seen, 3),
        "last_error": peer.last_error.get(name),
        **_relay_row(registry, peer, name, progress.version if progress else latest),
    }


def _relay_row(
    registry: Registry, peer: PeerState, name: str, version: int | None
) -> dict[str, Any]:
    """A subscriber's relay columns: its offer, where it reads `version`'s stripes from,
    and the bytes readers verified from it over the model's retained versions."""
    offer = registry.relays.offered(peer.peer_id, name)
    model = registry.models.get(name)
    record = model.versions.get(version) if model is not None and version is not None else None
    parents = record.relay.routes.get(peer.peer_id) if record is not None else None
    served = (
        sum(r.relay.served_by.get(peer.name, 0) for r in model.versions.values())
        if model is not None
        else 0
    )
    return {
        "relay_endpoint": offer.endpoint if offer is not None else None,
        "reads_from": _names(registry, parents) if parents is not None else None,
        "served_bytes": served,
    }


def _names(registry: Registry, parents: tuple[str, ...]) -> list[str]:
    """Parent ids per stripe as stable names; the trainer is "trainer"."""
    names = []
    for parent in parents:
        peer = registry.peers.get(parent) if parent else None
        names.append("trainer" if not parent else peer.name if peer is not None else parent)
    return names


def relay_status(
    registry: Registry, name: str, version: int, record: VersionRecord
) -> dict[str, Any]:
    """Who reads `version` from whom, each node's rate, and how much each holder served
    (from `Progress.sources`); at most `_MAX_RELAY_ROWS` nodes, by stable name."""
    relay = record.relay
    ids = relay.stagers | set(relay.routes)
    known = [registry.peers[p] for p in ids if p in registry.peers]
    nodes = []
    # The first rows by name, without sorting every node of a large fleet.
    for peer in heapq.nsmallest(_MAX_RELAY_ROWS, known, key=lambda p: (p.name, p.peer_id)):
        progress = peer.progress.get(name)
        progress = progress if progress is not None and progress.version == version else None
        parents = relay.routes.get(peer.peer_id)
        nodes.append(
            {
                "name": peer.name,
                "peer_id": peer.peer_id,
                "state": "applied" if peer.applied.get(name, -1) >= version else _state(peer, name),
                "reads_from": _names(registry, parents) if parents is not None else None,
                "progress": round(progress.bytes_done / progress.bytes_total, 4)
                if progress and progress.bytes_total
                else None,
                "bytes_per_s": progress.bytes_per_s if progress else None,
                "read_bytes": {
                    source or "trainer": n
                    for source, n in relay.served.get(peer.peer_id, {}).items()
                },
                "served_bytes": relay.served_by.get(peer.name, 0),
            }
        )
    holders = heapq.nsmallest(_MAX_RELAY_ROWS, ((n, b) for n, b in relay.served_by.items() if n))
    return {
        "fanout": registry.relays.fanout,
        "planned_nodes": len(relay.plan.nodes) if relay.plan is not None else 0,
        "served_bytes": {
            "trainer": relay.served_by.get("", 0),
            "holders": dict(holders),
        },
        "nodes": nodes,
        "nodes_total": len(known),
    }


def build_app(
    registry: Registry,
    stats: BrokerStats,
    *,
    admin: AdminActions | None = None,
    read_token: str | None = None,
    admin_token: str | None = None,
) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return _respond(
            {
                "status": "ok",
                "uptime_s": round(time.time() - stats.started_at, 3),
                "state": {
                    "last_error": stats.state_last_error,
                    "write_errors_total": stats.state_write_errors_total,
                    "written_at": stats.state_written_at,
                },
                "security": stats.security,
            }
        )

    async def models(request: web.Request) -> web.Response:
        now = time.time()
        return _respond(
            {"models": [model_summary(registry, n, now) for n in sorted(registry.models)]}
        )

    async def model_or_version(request: web.Request) -> web.Response:
        path: str = request.match_info["path"]
        name, sep, version_text = path.rpartition("/versions/")
        if sep and name in registry.models:
            return _version(name, version_text)
        if path not in registry.models:
            return _not_found(f"no model named {path!r}; GET /v1/models lists them")
        summary = model_summary(registry, path, time.time())
        summary["history"] = [
            {"version": v, "announced_at": t} for v, t in registry.models[path].history
        ]
        return _respond(summary)

    def _version(name: str, version_text: str) -> web.Response:
        try:
            version = int(version_text)
        except ValueError:
            return _respond(
                {"error": "bad_request", "detail": f"version {version_text!r} is not an integer"},
                400,
            )
        record = registry.models[name].versions.get(version)
        if record is None:
            readable = sorted(
                v for v, r in registry.models[name].versions.items() if not r.retiring
            )
            return _not_found(f"{name} version {version} is not readable (readable: {readable})")
        manifest = record.manifest
        return _respond(
            {
                "model": name,
                "version": version,
                "announced_at": record.announced_at,
                "retiring": record.retiring,
                "leases": len(record.leases),
                "world_size": manifest.world_size,
                "total_bytes": manifest.total_bytes,
                "payload_bytes": manifest.payload_bytes,
                "num_tensors": len(manifest.tensors),
                "num_buckets": len(manifest.buckets),
                "num_regions": len(manifest.regions),
                "checksum_algorithm": manifest.checksum_algorithm,
                "unreadable": record.unreadable,
                "relay": relay_status(registry, name, version, record),
                "tensors": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                    for t in manifest.tensors[:_MAX_TENSOR_ROWS]
                ],
            }
        )

    async def subscribers(request: web.Request) -> web.Response:
        query = request.query
        try:
            limit = int(query.get("limit", DEFAULT_PAGE))
            offset = int(query.get("offset", 0))
        except ValueError:
            return _respond(
                {"error": "bad_request", "detail": "limit and offset are integers"}, 400
            )
        state = query.get("state")
        try:
            min_lag = int(query["min_lag"]) if "min_lag" in query else None
        except ValueError:
            min_lag = -1
        if (
            not 1 <= limit <= MAX_PAGE
            or offset < 0
            or (state is not None and state not in _STATES)
            or (min_lag is not None and not 0 <= min_lag <= _MAX_LAG)
        ):
            return _respond(
                {
                    "error": "bad_request",
                    "detail": f"limit is 1..{MAX_PAGE}, offset >= 0, state one of {list(_STATES)}, "
                    f"min_lag 0..{_MAX_LAG} (versions behind the newest)",
                },
                400,
            )
        total, page = await fleet_async(
            registry,
            time.time(),
            limit=limit,
            offset=offset,
            model=query.get("model"),
            state=state,
            min_lag=min_lag,
        )
        return _respond({"subscribers": page, "total": total, "limit": limit, "offset": offset})

    async def metrics(request: web.Request) -> web.Response:
        body = await render_off_loop(stats)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def _admin_refusal(request: web.Request) -> web.Response | None:
        if admin is None or admin_token is None:
            return _respond(
                {
                    "error": "forbidden",
                    "detail": "admin routes are off: start the broker with --http-admin-token-file",
                },
                403,
            )
        if not _bearer(request, admin_token):
            logger.warning("refused an HTTP admin request path=%s", request.path)
            return _unauthorized("this route needs Authorization: Bearer <admin token>")
        return None

    async def retire(request: web.Request) -> web.Response:
        refusal = _admin_refusal(request)
        if refusal is not None:
            return refusal
        assert admin is not None
        path: str = request.match_info["path"]
        name, sep, rest = path.rpartition("/versions/")
        version_text, _, action = rest.partition("/")
        if not sep or action != "retire" or not version_text.isdigit():
            return _not_found("POST /v1/models/{model}/versions/{version}/retire")
        try:
            admin.defer(admin.retire_version(name, int(version_text), by="http"))
        except BrokerError as exc:
            return _respond({"error": exc.code, "detail": exc.detail}, 404)
        return _respond({"model": name, "version": int(version_text), "retiring": True})

    async def delete(request: web.Request) -> web.Response:
        refusal = _admin_refusal(request)
        if refusal is not None:
            return refusal
        assert admin is not None
        name: str = request.match_info["path"]
        try:
            admin.defer(admin.delete_model(name, by="http"))
        except BrokerError as exc:
            return _respond({"error": exc.code, "detail": exc.detail}, 404)
        return _respond({"model": name, "deleted": True})

    @web.middleware
    async def read_auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if (
            read_token is not None
            and request.method == "GET"
            and request.path != "/healthz"
            and not _bearer(request, read_token, admin_token)
        ):
            return _unauthorized("this endpoint needs Authorization: Bearer <read token>")
        return await handler(request)

    @web.middleware
    async def json_errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _not_found(f"no route {request.path}; try /v1/models, /v1/subscribers, /metrics")
        except web.HTTPMethodNotAllowed:
            return _respond(
                {
                    "error": "method_not_allowed",
                    "detail": "this route is read-only (GET); the admin routes are POST "
                    ".../versions/{v}/retire "
                    "and DELETE /v1/models/{model}",
                },
                405,
            )

    app = web.Application(middlewares=[json_errors, read_auth], client_max_size=64 * 1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{path:.+}", model_or_version)
    app.router.add_get("/v1/subscribers", subscribers)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/models/{path:.+}", retire)
    app.router.add_delete("/v1/models/{path:.+}", delete)
    return app


async def serve_http(
    registry: Registry,
    stats: BrokerStats,
    *,
    host: str,
    port: int,
    idle_timeout_s: float = 15.0,
    on_ready: Callable[[int], None] | None = None,
    admin: AdminActions | None = None,
    read_token: str | None = None,
    admin_token: str | None = None,
) -> None:
    """Serve the status endpoint until cancelled; `on_ready` gets the bound port.

    A connection that sends no complete request for `idle_timeout_s` (idle, or a slow
    sender) is closed: aiohttp's keep-alive timer runs from the connection's start."""
    app = build_app(registry, stats, admin=admin, read_token=read_token, admin_token=admin_token)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        logger.info("status endpoint listening url=http://%s:%d", host, bound)
        if on_ready is not None:
            on_ready(bound)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
