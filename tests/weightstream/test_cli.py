"""The command line says what went wrong and what to do, in one line, with a non-zero exit."""

from __future__ import annotations

import logging
import socket

import pytest

from weightstream.cli import main


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_status_without_a_broker_says_how_to_point_at_one(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert main(["status", "--http", f"http://127.0.0.1:{_closed_port()}"]) == 1
    assert "is the broker running? Pass its URL with --http" in caplog.text


def test_subscribe_without_a_broker_times_out_with_advice(caplog: pytest.LogCaptureFixture):
    # No broker behind the endpoint: the hello times out (no hang) and the error says what to do.
    with caplog.at_level(logging.ERROR):
        code = main(
            ["subscribe", "--broker", f"tcp://127.0.0.1:{_closed_port()}", "--transport", "zmq"]
        )
    assert code == 1
    assert "start one with `weightstream broker`, or pass --broker" in caplog.text


def test_bad_sizes_and_transport_lists_are_usage_errors(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main(["publish", "--version", "1", "--synthetic", "12x"])
    assert exited.value.code == 2
    assert "bad size '12x': write e.g. 64MB, 1GiB or 1e9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["subscribe", "--transport", "carrier-pigeon"])
    assert "use auto, or a comma-separated list of mooncake, zmq, shm" in capsys.readouterr().err


def test_a_multi_rank_publish_without_a_job_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WEIGHTSTREAM_JOB", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["publish", "--versions", "1", "--world-size", "2", "--rank", "1"])
    assert exited.value.code == 2
    assert "--world-size 2 needs --job ID, the same on every rank" in capsys.readouterr().err
