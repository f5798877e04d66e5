"""What `weightstream publish` and `weightstream subscribe` do, as plain async functions.

A publish job's lifecycle (`PublishJob.lifecycle`), once its versions are published:
`until-retired` (the default) keeps their bytes readable until the broker retires them all (or,
with `wait_subscribers`, until that many subscribers applied the last one); `serve` until
stopped; `exit` at once (subscribers can no longer read the bytes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import load_checkpoint, synthetic_llama
from schemas.messages import RelayOffer
from schemas.validate import InvalidManifest, validate_manifest
from streamer.client import connect
from streamer.signing import UntrustedVersion
from streamer.transport.choice import make_receivers, make_senders
from streamer.transport.mooncake import MooncakeReceiver
from subscribers.dtypes import torch_dtype
from subscribers.relay import RelayServer
from subscribers.relay_client import PeerManifests
from subscribers.staging import Staging
from subscribers.subscriber import PullConfig, Subscriber
from subscribers.swap import SwapReport, TorchSwapper
from weightstream.progress import Progress, format_bytes, format_rate

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from publishers.publisher import Publisher, PublishResult
    from schemas.manifest import Manifest
    from streamer.client import BrokerClient
    from streamer.config import ClientConfig
    from streamer.signing_keys import SigningKey, TrustedKeys
    from subscribers.pull import PullReport

__all__ = ["PublishJob", "SubscribeJob", "run_publish", "run_subscribe", "shard_of"]

logger = logging.getLogger(__name__)


def shard_of(
    tensors: dict[str, torch.Tensor], rank: int, world_size: int
) -> dict[str, torch.Tensor]:
    """The tensors rank `rank` of `world_size` publishes: every `world_size`-th, from `rank`."""
    return {
        name: t for index, (name, t) in enumerate(tensors.items()) if index % world_size == rank
    }


Lifecycle = Literal["until-retired", "serve", "exit"]
RETIRE_POLL_S = 0.2


@dataclass(frozen=True)
class PublishJob:
    client: ClientConfig
    model: str
    versions: list[int]
    """Versions to publish; empty with `next_versions`."""
    checkpoint: str | None
    synthetic_bytes: int
    seed: int
    rank: int
    world_size: int
    transport: list[str]
    host: str
    bucket_bytes: int
    wait_subscribers: int
    wait_timeout_s: float
    interval_s: float
    lifecycle: Lifecycle = "until-retired"
    next_versions: int = 0
    """Publish this many versions after the broker's latest of `model` (`--versions next:N`)."""
    protocol: str = "tcp"
    zmq_port: int = 0
    """Fixed port of the zmq sender (0: a free one)."""
    job: str | None = None
    """The trainer job every rank shares (None: a random one, for a single rank)."""
    signing_key: SigningKey | None = None
    secure_digests: bool = False


async def _versions_of(job: PublishJob, publisher: Publisher) -> list[int]:
    if not job.next_versions:
        return job.versions
    # Subscribed's reply carries the broker's latest version of the model.
    await publisher.client.subscribe(job.model)
    latest = publisher.client.newest_version(job.model)
    first = (latest or 0) + 1
    logger.info("continuing model=%s after version=%s", job.model, latest)
    return list(range(first, first + job.next_versions))


async def _wait_applied(publisher: Publisher, version: int, job: PublishJob) -> int:
    """Wait for `job.wait_subscribers` to apply `version`, on one updating line on a TTY."""
    progress = Progress(f"v{version}: waiting for {job.wait_subscribers} subscribers")
    wait = asyncio.create_task(publisher.wait_applied(version, job.wait_subscribers))
    started = time.perf_counter()
    try:
        async with asyncio.timeout(job.wait_timeout_s):
            while not wait.done():
                await asyncio.wait({wait}, timeout=0.5)
                progress.update(f"{time.perf_counter() - started:.0f} s")
            return await wait
    finally:
        wait.cancel()
        progress.close()


async def _publish_shown(
    publisher: Publisher, version: int, shard: dict[str, torch.Tensor], nbytes: int
) -> PublishResult:
    """`publisher.publish`, with packing (the long part for a checkpoint) on one updating
    line on a TTY: its size, then the seconds it has taken."""
    progress = Progress(f"v{version}: packing {len(shard)} tensors, {format_bytes(nbytes)}:")
    publish = asyncio.create_task(publisher.publish(version, shard))
    started = time.perf_counter()
    try:
        while not publish.done():
            progress.update(f"{time.perf_counter() - started:.0f} s")
            await asyncio.wait({publish}, timeout=0.5)
        result = await publish
        progress.update(f"published in {result.seconds:.2f} s")
        return result
    finally:
        publish.cancel()
        progress.close()


async def run_publish(job: PublishJob) -> None:
    ctx = zmq.asyncio.Context()
    try:
        senders, node_local = make_senders(
            job.transport, host=job.host, protocol=job.protocol, zmq_port=job.zmq_port
        )
        async with open_publisher(
            job.client,
            model=job.model,
            sender=senders,
            rank=job.rank,
            world_size=job.world_size,
            bucket_bytes=job.bucket_bytes,
            node_local=node_local,
            context=ctx,
            job=job.job,
            signing_key=job.signing_key,
            secure_digests=job.secure_digests,
        ) as publisher:
            for index, version in enumerate(await _versions_of(job, publisher)):
                if index and job.interval_s:
                    await asyncio.sleep(job.interval_s)
                if job.checkpoint:
                    tensors = await asyncio.to_thread(load_checkpoint, job.checkpoint)
                else:
                    tensors = await asyncio.to_thread(
                        synthetic_llama, job.synthetic_bytes, version=version, seed=job.seed
                    )
                shard = shard_of(tensors, job.rank, job.world_size)
                nbytes = sum(t.nbytes for t in shard.values())
                result = await _publish_shown(publisher, version, shard, nbytes)
                logger.info(
                    "version=%d size=%s tensors=%d published in %.2f s",
                    version,
                    format_bytes(nbytes).replace(" ", ""),
                    len(shard),
                    result.seconds,
                )
                del tensors, shard  # a mapped checkpoint's pages can go
                if job.wait_subscribers:
                    started = time.perf_counter()
                    count = await _wait_applied(publisher, version, job)
                    logger.info(
                        "version=%d applied by %d subscribers in %.2f s",
                        version,
                        count,
                        time.perf_counter() - started,
                    )
            await _serve(publisher, job)
    finally:
        ctx.destroy(linger=0)


async def _serve(publisher: Publisher, job: PublishJob) -> None:
    """Keep the published bytes readable for as long as `job.lifecycle` says."""
    if job.lifecycle == "exit":
        logger.info("exiting after publishing (--exit): the bytes are no longer readable")
        return
    if job.lifecycle == "serve":
        logger.info("serving the published bytes until stopped (SIGTERM, Ctrl-C)")
        await asyncio.Event().wait()
    if job.wait_subscribers:
        logger.info("exiting: the last version was applied by %d subscribers", job.wait_subscribers)
        return
    logger.info(
        "serving the published bytes until the broker retires them (a newer version), or stopped"
    )
    # The publisher's retire loop empties `publisher.live` (it has no event to wait on); no
    # deadline: serving is this process's job until then.
    while publisher.live:  # noqa: ASYNC110
        await asyncio.sleep(RETIRE_POLL_S)
    logger.info("exiting: every version this process published is retired")


class _ShownSubscriber(Subscriber):
    """A Subscriber whose pulls also show on one updating line on a TTY."""

    def _progress(self, version: int) -> Callable[[int, int, float], Awaitable[None]]:
        report = super()._progress(version)
        line = Progress(f"pulling model={self.model} version={version}:")

        async def on_progress(done: int, total: int, rate: float) -> None:
            line.update(
                f"{done / max(total, 1) * 100:3.0f}% of {format_bytes(total)}, {format_rate(rate)}"
            )
            if done >= total:
                line.close()
            await report(done, total, rate)

        return on_progress


@dataclass(frozen=True)
class SubscribeJob:
    client: ClientConfig
    model: str
    transport: list[str]
    host: str
    pull: PullConfig
    init_checkpoint: str | None
    dump_dir: str | None
    dump_all: bool
    exit_after_version: int | None
    trusted_keys: TrustedKeys | None = None
    protocol: str = "tcp"
    relay_listen: tuple[str, int] | None = None
    """Serve what this subscriber holds to others there (host, port; 0: a free port)."""
    relay_encrypt: bool = False
    relay_one_sided: bool = False
    """Readers may read relayed buckets one-sided over our mooncake receiver's engine."""


def _tensors_for(manifest: Manifest) -> dict[str, torch.Tensor]:
    """An engine's parameters shaped after a manifest (zeros until the first swap)."""
    return {s.name: torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in manifest.tensors}


def _dump(directory: Path, version: int, tensors: dict[str, torch.Tensor], keep_all: bool) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"v{version}.safetensors"
    tmp = directory / f".v{version}.tmp"
    save_file(tensors, str(tmp), metadata={"version": str(version)})
    os.replace(tmp, target)
    if not keep_all:
        for old in directory.glob("v*.safetensors"):
            if old != target:
                old.unlink(missing_ok=True)


async def _first_usable_manifest(client: BrokerClient, job: SubscribeJob) -> Manifest:
    """The first announced manifest whose shapes the engine may take: one that passes the
    validator and, with `--trust`, is signed by a trusted key. Others are reported, skipped."""
    after = -1
    while True:
        manifest = await client.next_manifest(job.model, after=after)
        try:
            validate_manifest(manifest, job.pull.manifest_limits)
            if job.trusted_keys is not None:
                await asyncio.to_thread(
                    job.trusted_keys.verify, manifest, require_digests=job.pull.require_digests
                )
        except (InvalidManifest, UntrustedVersion) as exc:
            logger.warning(
                "refused model=%s version=%d reason=%s", job.model, manifest.version, exc
            )
            await client.report_failure(job.model, manifest.version, f"{type(exc).__name__}: {exc}")
            after = manifest.version
            continue
        return manifest


async def run_subscribe(job: SubscribeJob) -> None:
    ctx = zmq.asyncio.Context()
    receivers = make_receivers(job.transport, host=job.host, protocol=job.protocol)
    done = asyncio.Event()
    relay: RelayServer | None = None
    peer_manifests: PeerManifests | None = None
    try:
        if job.relay_listen is not None:
            host, port = job.relay_listen
            engines = [r for r in receivers if isinstance(r, MooncakeReceiver)]
            if job.relay_one_sided and not engines:
                raise ValueError("--relay-one-sided needs a mooncake transport")
            relay = RelayServer(
                host=host,
                port=port,
                encrypt=job.relay_encrypt,
                one_sided=engines[0] if job.relay_one_sided else None,
            )
        async with connect(job.client, role="subscriber", context=ctx) as client:
            offer = None
            if relay is not None:
                offer = RelayOffer(endpoint=relay.endpoint, server_key=relay.server_key)
                # Before subscribing: the first version's manifest comes from a peer too.
                peer_manifests = PeerManifests(server=relay, routes=client.route)
                client.manifest_peers = peer_manifests
            await client.subscribe(job.model, relay=offer)
            if job.init_checkpoint:
                tensors = await asyncio.to_thread(load_checkpoint, job.init_checkpoint)
            else:
                logger.info("waiting for the first version of model=%s", job.model)
                first = await _first_usable_manifest(client, job)
                tensors = _tensors_for(first)
            swapper = TorchSwapper(tensors)

            async def on_applied(manifest: Manifest, pull: PullReport, swap: SwapReport) -> None:
                if job.dump_dir:
                    await asyncio.to_thread(
                        _dump, Path(job.dump_dir), manifest.version, tensors, job.dump_all
                    )
                if (
                    job.exit_after_version is not None
                    and manifest.version >= job.exit_after_version
                ):
                    done.set()

            subscriber = _ShownSubscriber(
                client=client,
                receivers=receivers,
                swapper=swapper,
                model=job.model,
                config=job.pull,
                on_applied=on_applied,
                trusted_keys=job.trusted_keys,
                spare_staging=None if relay is None else Staging(receivers=receivers),
                relay=relay,
            )
            runner = asyncio.create_task(subscriber.run(), name="subscriber")
            waiter = asyncio.create_task(done.wait(), name="exit-after")
            try:
                finished, _ = await asyncio.wait(
                    {runner, waiter}, return_when=asyncio.FIRST_COMPLETED
                )
                if runner in finished:
                    runner.result()  # a failure of the subscriber loop surfaces here
                logger.info("reached version=%s, exiting", subscriber.applied)
            finally:
                for task in (runner, waiter):
                    task.cancel()
                await asyncio.gather(runner, waiter, return_exceptions=True)
                subscriber.close()
    finally:
        if peer_manifests is not None:
            peer_manifests.close()
        if relay is not None:
            relay.close()
        for receiver in receivers:
            receiver.close()
        ctx.destroy(linger=0)
