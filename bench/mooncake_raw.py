"""Raw mooncake tcp reads, the floor our pull is measured against (no broker, no checksums).

    python -m bench.mooncake_raw serve --host H --nbytes N          # prints {"session", "address"}
    python -m bench.mooncake_raw read --host H --session S --address A --nbytes N [--chunk C]

`read` pulls the whole region `--repeat` times (after one warm-up read, which pays the
connection handshake and the page faults of fresh memory) and prints the median GB/s as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from schemas.manifest import MooncakeLocator
from streamer.transport import Fetch, MooncakeReceiver, MooncakeSender, Region


def serve(args: argparse.Namespace) -> None:
    buffer = np.random.default_rng(0).integers(0, 255, size=args.nbytes, dtype=np.uint8)
    sender = MooncakeSender(host=args.host)
    [locator] = sender.expose([Region(buffer.ctypes.data, buffer.nbytes)])
    assert isinstance(locator, MooncakeLocator)
    print(json.dumps({"session": locator.session, "address": locator.address}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    sender.close()


def read(args: argparse.Namespace) -> None:
    target = np.empty(args.nbytes, dtype=np.uint8)
    target.fill(0)
    receiver = MooncakeReceiver(host=args.host)
    receiver.register(Region(target.ctypes.data, target.nbytes))
    locator = MooncakeLocator(session=args.session, address=args.address)
    fetches = [
        Fetch(locator, offset, min(args.chunk, args.nbytes - offset), target.ctypes.data + offset)
        for offset in range(0, args.nbytes, args.chunk)
    ]
    seconds = []
    for attempt in range(args.repeat + 1):
        started = time.perf_counter()
        receiver.fetch(fetches)
        if attempt:  # the first read is the warm-up
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    print(json.dumps({"gbps": args.nbytes / median / 1e9, "seconds": seconds}), flush=True)
    receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--nbytes", type=int, required=True)
    r = sub.add_parser("read")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--session", required=True)
    r.add_argument("--address", type=int, required=True)
    r.add_argument("--nbytes", type=int, required=True)
    r.add_argument("--chunk", type=int, default=64 << 20)
    r.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    serve(args) if args.command == "serve" else read(args)


if __name__ == "__main__":
    main()
