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
                                                  behind the newest), where it took the
                                                  applied version's manifest
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

__all__ = [
    "AdminActions",
    "SubscriberRow",
    "build_app",
    "fleet",
    "fleet_async",
    "relay_status",
    "serve_http",
]

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
"""Subscribers a status scan looks at (renders or filters) before it lets the event loop
run (`fleet_async`)."""
_COUNT_COST = 8
"""Subscribers only counted (outside an unfiltered page) cost 1/_COUNT_COST of one looked
at: a step counts at most `_SCAN_STEP * _COUNT_COST` (~3 ms at 10,000; a rendered row costs
~10x a counted one)."""


class SubscriberRow(msgspec.Struct, gc=False):
    """One row of `/v1/subscribers` (one subscriber, one model it follows or applied).

    Encoded by msgspec in field order (the JSON object's keys); no dict per row, and not
    tracked by the garbage collector. Evolve additively: new fields go last."""

    peer_id: str
    name: str
    host: str
    pid: int
    state: str
    model: str
    applied_version: int | None
    latest_version: int | None
    lag: int | None
    pulling_version: int | None
    progress: float | None
    bytes_per_s: float | None
    last_pull_s: float | None
    last_pause_s: float | None
    last_heartbeat_age_s: float
    last_error: str | None
    relay_endpoint: str | None
    """Its relay offer for this model (None: it does not relay)."""
    reads_from: list[str] | None
    """Where it reads the pulling (else the latest) version's stripes from, per stripe."""
    served_bytes: int
    """Bytes readers verified from it over the model's retained versions."""
    manifest_source: str | None
    """Where it took the applied version's manifest: "broker" or "peer:<name>" (None: not
    known, an older subscriber, or nothing applied)."""


def fleet(
    registry: Registry,
    now: float,
    *,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
    model: str | None = None,
    state: str | None = None,
    min_lag: int | None = None,
) -> tuple[int, list[SubscriberRow]]:
    """One row per subscriber and model it follows, by peer id: (rows in all, this page).

    `min_lag`: only rows at least that many versions behind their model's newest (a
    subscriber that has applied nothing yet is behind any). One pass over the subscribers
    (kept sorted by the registry) that renders only the rows of the page: a page of 1,000
    at 10,000 subscribers in ~5 ms (bench/status_bench.py, bench/RESULTS_FLEET.md).
    """
    page: list[SubscriberRow] = []
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
) -> tuple[int, list[SubscriberRow]]:
    """`fleet`, letting the event loop run every `_SCAN_STEP` subscribers: a page of a large
    fleet does not hold up the broker's ZeroMQ loop for the whole scan (the HTTP route's)."""
    page: list[SubscriberRow] = []
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
    page: list[SubscriberRow],
    limit: int,
    offset: int,
    model: str | None,
    state: str | None,
    min_lag: int | None,
) -> Generator[None, None, int]:
    """Fill `page`, pausing (yield) every `_SCAN_STEP` subscribers looked at (or
    `_SCAN_STEP * _COUNT_COST` only counted); returns the total. The id list is the
    registry's snapshot (replaced, never changed, as peers come and go), and a peer
    forgotten during a pause is skipped."""
    total = 0
    end = offset + limit
    rows = _Rows(registry, now)
    latest = rows.latest
    unfiltered = state is None and min_lag is None
    peers = registry.peers
    step = _SCAN_STEP * _COUNT_COST
    spent = 0
    for peer_id in registry.subscriber_ids():
        if spent >= step:
            spent = 0
            yield
        peer = peers.get(peer_id)
        if peer is None:
            continue
        subscriptions = peer.subscriptions
        applied = peer.applied
        if unfiltered:
            # Rows outside the page: counted, not looked at.
            if model is not None:
                count = 1 if model in subscriptions or model in applied else 0
            elif applied.keys() <= subscriptions:
                count = len(subscriptions)
            else:
                count = len(subscriptions | applied.keys())
            if total + count <= offset or total >= end:
                total += count
                spent += 1
                continue
        spent += _COUNT_COST
        if model is not None:
            names: Collection[str] = (model,) if model in subscriptions or model in applied else ()
        elif len(subscriptions) == 1 and applied.keys() <= subscriptions:
            names = subscriptions
        else:
            names = sorted(subscriptions | applied.keys())
        for name in names:
            if state is not None and _state(peer, name) != state:
                continue
            if min_lag is not None and not _behind(latest.get(name), applied.get(name), min_lag):
                continue
            if offset <= total < end:
                page.append(rows.row(peer, name))
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


class _Rows:
    """Renders rows for one scan, reading each model's latest version, retained versions
    and relay offers once (not once per row)."""

    def __init__(self, registry: Registry, now: float) -> None:
        self.registry = registry
        self.now = now
        self.latest = {name: m.latest for name, m in registry.models.items()}
        self._models: dict[str, tuple[dict[int, VersionRecord], list[dict[str, int]]]] = {}

    def _model(self, name: str) -> tuple[dict[int, VersionRecord], list[dict[str, int]]]:
        known = self._models.get(name)
        if known is None:
            model = self.registry.models.get(name)
            versions = model.versions if model is not None else {}
            known = (versions, [r.relay.served_by for r in versions.values()])
            self._models[name] = known
        return known

    def row(self, peer: PeerState, name: str) -> SubscriberRow:
        latest = self.latest.get(name)
        applied = peer.applied.get(name)
        progress = peer.progress.get(name)
        versions, served_by = self._model(name)
        offer = self.registry.relays.offered(peer.peer_id, name)
        # Relay columns: where it reads the pulling (else the latest) version from.
        version = progress.version if progress is not None else latest
        record = versions.get(version) if version is not None else None
        parents = record.relay.routes.get(peer.peer_id) if record is not None else None
        served = 0
        for holders in served_by:
            served += holders.get(peer.name, 0)
        # Positional, in field order: msgspec builds it faster than from keywords.
        return SubscriberRow(
            peer.peer_id,
            peer.name,
            peer.host,
            peer.pid,
            "gone" if peer.gone else progress.state if progress is not None else "idle",
            name,
            applied,
            latest,
            None if latest is None or applied is None else latest - applied,
            progress.version if progress is not None else None,
            round(progress.bytes_done / progress.bytes_total, 4)
            if progress is not None and progress.bytes_total
            else None,
            progress.bytes_per_s if progress is not None else None,
            peer.last_pull_s.get(name),
            peer.last_pause_s.get(name),
            round(self.now - peer.last_seen, 3),
            peer.last_error.get(name),
            offer.endpoint if offer is not None else None,
            _names(self.registry, parents) if parents is not None else None,
            served,
            peer.manifest_source.get(name),
        )


def _subscriber_row(registry: Registry, peer: PeerState, name: str, now: float) -> SubscriberRow:
    """One row on its own (`fleet` renders a page's rows through one `_Rows`)."""
    return _Rows(registry, now).row(peer, name)


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
