"""A real engine process for the fault suite: Subscriber + TorchSwapper + VersionGate.

    python -m tests.faults.zero_copy_engine --broker tcp://... --model m --dump-dir d --hold-file h

Its engine thread runs steps under the gate; while `--hold-file` exists, one step stays open
(and `<hold-file>.stepping` exists), so a staged version waits at the swap. After each swap
the live tensors are dumped as `<dump-dir>/v<N>.safetensors`, for the test to compare with
the bytes version N must have. Logs go to stderr (`staged model=... version=N` included).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import zmq.asyncio
from safetensors.torch import save_file

from streamer.client import connect
from streamer.config import ClientConfig
from streamer.transport.shm import ShmReceiver
from streamer.transport.zmq_frames import ZmqFrameReceiver
from subscribers.dtypes import torch_dtype
from subscribers.subscriber import PullConfig, Subscriber
from subscribers.swap import TorchSwapper, VersionGate

if TYPE_CHECKING:
    from schemas.manifest import Manifest
    from streamer.transport.base import BulkReceiver
    from subscribers.pull import PullReport
    from subscribers.swap import SwapReport


def _engine(gate: VersionGate, hold: Path, stop: threading.Event) -> None:
    stepping = hold.with_name(hold.name + ".stepping")
    while not stop.is_set():
        with gate.step():
            if hold.exists():
                stepping.touch()
                while hold.exists() and not stop.is_set():
                    time.sleep(0.02)
                stepping.unlink(missing_ok=True)
        time.sleep(0.01)


async def main(args: argparse.Namespace) -> None:
    ctx = zmq.asyncio.Context()
    receivers: list[BulkReceiver] = [ShmReceiver(), ZmqFrameReceiver(timeout_s=5)]
    stop = threading.Event()
    dump_dir = Path(args.dump_dir)
    try:
        async with connect(
            ClientConfig(
                broker=args.broker,
                key_file=os.environ.get("WEIGHTSTREAM_KEY_FILE"),
                broker_key_file=os.environ.get("WEIGHTSTREAM_BROKER_KEY_FILE"),
            ),
            role="subscriber",
            context=ctx,
        ) as client:
            await client.subscribe(args.model)
            first = await client.next_manifest(args.model, after=-1)
            tensors = {
                s.name: torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in first.tensors
            }
            gate = VersionGate()
            engine = threading.Thread(
                target=_engine, args=(gate, Path(args.hold_file), stop), daemon=True
            )
            engine.start()

            async def on_applied(manifest: Manifest, pull: PullReport, swap: SwapReport) -> None:
                target = dump_dir / f"v{manifest.version}.safetensors"
                tmp = dump_dir / f".v{manifest.version}.tmp"
                await asyncio.to_thread(save_file, tensors, str(tmp))
                os.replace(tmp, target)

            subscriber = Subscriber(
                client=client,
                receivers=receivers,
                swapper=TorchSwapper(tensors, gate=gate),
                model=args.model,
                config=PullConfig(max_attempts=3, retry_backoff_s=0.2, pull_timeout_s=30),
                on_applied=on_applied,
            )
            try:
                await subscriber.run()
            finally:
                subscriber.close()
    finally:
        stop.set()
        for receiver in receivers:
            receiver.close()
        ctx.destroy(linger=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dump-dir", required=True)
    parser.add_argument("--hold-file", required=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    arguments = parser.parse_args()
    Path(arguments.dump_dir).mkdir(parents=True, exist_ok=True)
    asyncio.run(main(arguments))
