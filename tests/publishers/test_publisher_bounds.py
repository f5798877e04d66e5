"""A publisher holds a bounded number of versions' buffers, whatever the broker does, and a
Retire that says why (a pending version expired) frees them."""

from __future__ import annotations

import logging

import pytest
import zmq.asyncio

from publishers.publisher import PublishRefused, open_publisher
from streamer.transport import ZmqFrameSender
from tests.publishers.test_publisher import MODEL, tensors
from tests.support import broker_config, run_broker, until


async def test_past_max_buffer_sets_a_publish_is_refused_until_a_retire_frees_one(
    zmq_ctx: zmq.asyncio.Context, caplog: pytest.LogCaptureFixture
) -> None:
    # Rank 0 of 2, and rank 1 never comes: nothing is announced, so nothing retires normally.
    async with (
        run_broker(broker_config(pending_timeout_s=1.0)) as broker,
        open_publisher(
            broker.client_config(),
            model=MODEL,
            sender=ZmqFrameSender(),
            world_size=2,
            job="bounds-test",
            max_buffer_sets=2,
            context=zmq_ctx,
        ) as publisher,
    ):
        for version in (1, 2):
            assert not (await publisher.publish(version, tensors(version))).complete
        with pytest.raises(PublishRefused, match=r"already holds buffers of 2 versions \[1, 2\]"):
            await publisher.publish(3, tensors(3))
        assert sorted(publisher.live) == [1, 2]

        # The broker expires both after 1 s and says why; the retire loop frees them.
        with caplog.at_level(logging.WARNING, logger="publishers.publisher"):
            await until(lambda: not publisher.live, timeout_s=10)
        assert "ranks [1] of 2 never published" in caplog.text
        assert not (await publisher.publish(3, tensors(3))).complete
