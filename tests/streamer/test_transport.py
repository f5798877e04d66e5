"""One conformance suite for every bulk transport (sender + receiver pair).

Real mooncake TransferEngines over tcp on loopback (two engines in one process talk to each
other) and real ZeroMQ sockets; the memory is numpy arrays, addressed as `Region`s.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

from schemas.manifest import FrameLocator, Locator, MooncakeLocator
from streamer.errors import TransportError
from streamer.transport import (
    BulkReceiver,
    BulkSender,
    Fetch,
    Region,
    ZmqFrameReceiver,
    ZmqFrameSender,
)
from tests.support import MooncakeEngines

ZMQ_TIMEOUT_S = 3.0  # per reply: the first read of a new connection on a loaded machine
REFUSED = {"mooncake": r"failed \(status -\d+", "zmq": "refused a read"}
"""How each transport says a read was refused (answered, not left to time out)."""


@dataclass
class Pair:
    sender: BulkSender
    receiver: BulkReceiver
    foreign: Locator
    """A locator of the other kind, which this receiver must refuse."""
    another_receiver: Callable[[], BulkReceiver]
    kind: str = ""


def make_pair(request: pytest.FixtureRequest, *, disposable: bool) -> Iterator[Pair]:
    if request.param == "mooncake":
        mooncake: MooncakeEngines = request.getfixturevalue("mooncake")
        yield Pair(
            mooncake.sender(disposable=disposable),
            mooncake.receiver(),
            FrameLocator(endpoint="tcp://127.0.0.1:1", key="k"),
            mooncake.receiver,
            "mooncake",
        )
        return  # the mooncake fixture closes them
    built = Pair(
        ZmqFrameSender(host="127.0.0.1"),
        ZmqFrameReceiver(timeout_s=ZMQ_TIMEOUT_S),
        MooncakeLocator(session="127.0.0.1:1", address=4096),
        lambda: ZmqFrameReceiver(timeout_s=ZMQ_TIMEOUT_S),
        "zmq",
    )
    yield built
    built.receiver.close()
    built.sender.close()


@pytest.fixture(params=["mooncake", "zmq"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    yield from make_pair(request, disposable=False)


@pytest.fixture(params=["mooncake", "zmq"])
def failing_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A pair for a test that makes reads fail (see `MooncakeEngines` on why that matters)."""
    yield from make_pair(request, disposable=True)


def random_array(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def region_of(array: np.ndarray) -> Region:
    return Region(array.ctypes.data, array.nbytes)


def destination(pair: Pair, nbytes: int) -> np.ndarray:
    array = np.zeros(nbytes, dtype=np.uint8)
    pair.receiver.register(region_of(array))
    return array


def test_fetch_copies_exact_bytes_at_offsets_and_nothing_else(pair: Pair) -> None:
    source = random_array(1 << 16, seed=1)
    [locator] = pair.sender.expose([region_of(source)])
    target = destination(pair, 1 << 16)
    ranges = [(0, 1, 0), (1, 7, 100), (4093, 3000, 2000), ((1 << 16) - 1, 1, 9000)]
    for offset, nbytes, at in ranges:
        pair.receiver.fetch([Fetch(locator, offset, nbytes, target.ctypes.data + at)])

    expected = np.zeros_like(target)
    for offset, nbytes, at in ranges:
        expected[at : at + nbytes] = source[offset : offset + nbytes]
    np.testing.assert_array_equal(target, expected)

    whole = destination(pair, 1 << 16)
    pair.receiver.fetch([Fetch(locator, 0, 1 << 16, whole.ctypes.data)])
    np.testing.assert_array_equal(whole, source)


def test_one_batch_reads_many_ranges_of_several_regions(pair: Pair) -> None:
    sources = [random_array(40_000, seed=2), random_array(25_000, seed=3)]
    locators = pair.sender.expose([region_of(s) for s in sources])
    assert len(locators) == 2
    rng = np.random.default_rng(4)
    target = destination(pair, 300_000)
    fetches: list[Fetch] = []
    expected = np.zeros_like(target)
    cursor = 0
    for _ in range(200):
        which = int(rng.integers(0, 2))
        nbytes = int(rng.integers(1, 1200))
        offset = int(rng.integers(0, sources[which].nbytes - nbytes))
        fetches.append(Fetch(locators[which], offset, nbytes, target.ctypes.data + cursor))
        expected[cursor : cursor + nbytes] = sources[which][offset : offset + nbytes]
        cursor += nbytes + 3

    pair.receiver.fetch(fetches)

    np.testing.assert_array_equal(target, expected)


def test_concurrent_fetches_from_threads_each_get_their_own_bytes(pair: Pair) -> None:
    source = random_array(1 << 18, seed=5)
    [locator] = pair.sender.expose([region_of(source)])
    num_threads, rounds, chunk = 8, 10, 4096
    target = destination(pair, num_threads * rounds * chunk)

    def work(thread: int) -> None:
        for r in range(rounds):
            slot = (thread * rounds + r) * chunk
            offset = (thread * 7919 + r * 104729) % (source.nbytes - chunk)
            pair.receiver.fetch([Fetch(locator, offset, chunk, target.ctypes.data + slot)])
            np.testing.assert_array_equal(
                target[slot : slot + chunk], source[offset : offset + chunk]
            )

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for done in [pool.submit(work, t) for t in range(num_threads)]:
            done.result(timeout=30)  # re-raises a worker's failure here


def test_two_receivers_read_one_region(pair: Pair) -> None:
    source = random_array(10_000, seed=6)
    [locator] = pair.sender.expose([region_of(source)])
    other = pair.another_receiver()
    try:
        first, second = destination(pair, 10_000), np.zeros(10_000, dtype=np.uint8)
        other.register(region_of(second))
        pair.receiver.fetch([Fetch(locator, 0, 10_000, first.ctypes.data)])
        other.fetch([Fetch(locator, 0, 10_000, second.ctypes.data)])
    finally:
        other.close()
    np.testing.assert_array_equal(first, source)
    np.testing.assert_array_equal(second, source)


def test_registering_twice_is_harmless_and_one_registration_serves_many_fetches(
    pair: Pair,
) -> None:
    source = random_array(8192, seed=7)
    [locator] = pair.sender.expose([region_of(source)])
    target = np.zeros(8192, dtype=np.uint8)
    pair.receiver.register(region_of(target))
    pair.receiver.register(region_of(target))
    for round_ in range(50):
        offset = round_ * 128
        pair.receiver.fetch([Fetch(locator, offset, 128, target.ctypes.data + offset)])
    np.testing.assert_array_equal(target[: 50 * 128], source[: 50 * 128])
    pair.receiver.unregister(region_of(target))
    pair.receiver.unregister(region_of(target))  # a second unregister is a no-op


def test_exposing_a_region_again_keeps_every_locator_readable(pair: Pair) -> None:
    source = random_array(4096, seed=8)
    [first] = pair.sender.expose([region_of(source)])
    [second] = pair.sender.expose([region_of(source)])
    target = destination(pair, 8192)
    pair.receiver.fetch(
        [
            Fetch(first, 0, 4096, target.ctypes.data),
            Fetch(second, 0, 4096, target.ctypes.data + 4096),
        ]
    )
    np.testing.assert_array_equal(target, np.concatenate([source, source]))


def test_a_receiver_accepts_its_own_locators_and_refuses_others(pair: Pair) -> None:
    source = random_array(256, seed=9)
    [locator] = pair.sender.expose([region_of(source)])
    assert pair.receiver.accepts(locator)
    assert not pair.receiver.accepts(pair.foreign)
    target = destination(pair, 256)
    with pytest.raises(TypeError, match="cannot read"):
        pair.receiver.fetch([Fetch(pair.foreign, 0, 16, target.ctypes.data)])


def _fails(pair: Pair, fetch: Fetch, *, says: dict[str, str] = REFUSED) -> TransportError:
    """The read raises TransportError, and for the reason `says` gives for this transport."""
    with pytest.raises(TransportError, match=says[pair.kind]) as raised:
        pair.receiver.fetch([fetch])
    return raised.value


def test_reading_a_retracted_region_raises_transport_error(failing_pair: Pair) -> None:
    source = random_array(4096, seed=10)
    [locator] = failing_pair.sender.expose([region_of(source)])
    target = destination(failing_pair, 4096)
    failing_pair.receiver.fetch([Fetch(locator, 0, 4096, target.ctypes.data)])

    failing_pair.sender.retract([region_of(source)])

    _fails(failing_pair, Fetch(locator, 0, 4096, target.ctypes.data))


@pytest.mark.parametrize(("offset", "nbytes"), [(4000, 200), (0, 4097), (5000, 1)])
def test_reading_past_the_end_of_a_region_raises_transport_error(
    failing_pair: Pair, offset: int, nbytes: int
) -> None:
    source = random_array(4096, seed=11)
    [locator] = failing_pair.sender.expose([region_of(source)])
    target = destination(failing_pair, 8192)
    _fails(failing_pair, Fetch(locator, offset, nbytes, target.ctypes.data))


def test_reading_from_a_closed_sender_raises_transport_error(failing_pair: Pair) -> None:
    source = random_array(4096, seed=12)
    [locator] = failing_pair.sender.expose([region_of(source)])
    target = destination(failing_pair, 4096)
    failing_pair.receiver.fetch([Fetch(locator, 0, 4096, target.ctypes.data)])

    failing_pair.sender.close()

    # A closed zmq sender answers nothing: the receiver's own timeout ends the read.
    gone = {"mooncake": r"status -\d+: publisher gone", "zmq": r"no reply .* publisher alive\?"}
    _fails(failing_pair, Fetch(locator, 0, 4096, target.ctypes.data), says=gone)


def test_a_failed_batch_does_not_spoil_the_next_one(failing_pair: Pair) -> None:
    good, gone = random_array(4096, seed=13), random_array(4096, seed=14)
    [good_locator, gone_locator] = failing_pair.sender.expose([region_of(good), region_of(gone)])
    failing_pair.sender.retract([region_of(gone)])
    target = destination(failing_pair, 4096 * 8)
    batch = [Fetch(good_locator, 0, 4096, target.ctypes.data + 4096 * i) for i in range(7)]
    with pytest.raises(TransportError):
        failing_pair.receiver.fetch([Fetch(gone_locator, 0, 4096, target.ctypes.data), *batch])

    target[:] = 0
    failing_pair.receiver.fetch(batch)
    np.testing.assert_array_equal(target[: 4096 * 7], np.tile(good, 7))


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_fetching_from_many_short_lived_threads_does_not_leak_connections(pair: Pair) -> None:
    # A subscriber pulls every version with a fresh thread pool, so over a long run the
    # receiver serves thousands of threads that come and go.
    source = random_array(4096, seed=15)
    [locator] = pair.sender.expose([region_of(source)])
    target = destination(pair, 4096)

    def fetch_once() -> None:
        pair.receiver.fetch([Fetch(locator, 0, 4096, target.ctypes.data)])

    def in_threads(count: int) -> None:
        for _ in range(count):
            thread = threading.Thread(target=fetch_once)
            thread.start()
            thread.join()

    in_threads(5)  # warm up: connections a transport keeps for good
    before = _open_files()
    in_threads(40)
    assert _open_files() - before < 10
    np.testing.assert_array_equal(target, source)
