"""The command line says what went wrong and what to do, in one line, with a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

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
    assert "start one with `weightstream broker`, or point at it" in caplog.text
    assert "--broker" in caplog.text
    assert "WEIGHTSTREAM_BROKER" in caplog.text


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


# Subprocess runs: what a user sees on the terminal, and the exit code.

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "MC_LOG_LEVEL": "ERROR"}


def _cli(*args: str, timeout_s: float = 60, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "weightstream", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env or ENV,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    # INFO lines before the failure (the broker's "listening") are fine; the error is one line.
    lines = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, f"not one line:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_version_prints_the_installed_version():
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"weightstream {metadata.version('weightstream')}"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--log-level", "LOUD", "status"], ["unknown log level 'LOUD'", "DEBUG, INFO"]),
        (["status", "--log-level", "loud"], ["unknown log level 'loud'"]),
        (["subscribe", "--broker", "127.0.0.1:5555"], ["write tcp://HOST:PORT", "ipc://PATH"]),
        (["broker", "--endpoint", "localhost:5555"], ["write tcp://HOST:PORT"]),
        (["publish", "--version", "3-1"], ["empty version range '3-1'", "(1-3)"]),
        (["publish", "--versions", "next:0"], ["write next:N with N >= 1"]),
        (["demo", "--size", "12x"], ["bad size '12x'"]),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args: list[str], needles: list[str]):
    _one_line_error(_cli(*args), 2, *needles)


def test_log_level_works_after_the_subcommand(tmp_path: Path):
    # DEBUG given after the subcommand takes effect: the broker's debug lines appear.
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightstream",
            "broker",
            "--endpoint",
            "tcp://127.0.0.1:0",
            "--http-port",
            "0",
            "--ready-file",
            str(ready),
            "--log-level",
            "debug",
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines()]
    assert {r["level"] for r in records} >= {"DEBUG", "INFO"}, stderr
    listening = next(r for r in records if r["message"].startswith("broker listening"))
    assert listening["logger"] == "streamer.broker"
    assert listening["endpoint"].startswith("tcp://127.0.0.1:")
    assert listening["time"].endswith("Z")


def test_every_flag_has_help():
    from weightstream.cli import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in [("weightstream", parser), *subparsers.choices.items()]
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert not missing


def test_port_in_use_is_one_line_naming_the_port_and_the_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        zmq_busy = _cli("broker", "--endpoint", f"tcp://127.0.0.1:{port}", "--http-port", "0")
        http_busy = _cli("broker", "--endpoint", "tcp://127.0.0.1:0", "--http-port", str(port))
    line = _one_line_error(zmq_busy, 1, f"broker endpoint tcp://127.0.0.1:{port} is already in use")
    assert "--endpoint tcp://HOST:PORT" in line
    _one_line_error(http_busy, 1, f"HTTP status port {port} is already in use", "--http-port")


def test_parse_versions_refuses_an_empty_range():
    from weightstream.cli import parse_versions

    with pytest.raises(argparse.ArgumentTypeError, match="empty version range"):
        parse_versions("3-1")
    assert parse_versions("1-3,7") == [1, 2, 3, 7]


def test_zmq_sender_port_is_configurable_and_a_taken_one_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli(
            "publish",
            "--version",
            "1",
            "--transport",
            "zmq",
            "--zmq-port",
            str(port),
            "--broker",
            f"tcp://127.0.0.1:{_closed_port()}",
        )
    _one_line_error(result, 1, "already in use", "pick another port")
    from streamer.transport.zmq_frames import ZmqFrameSender

    free = _closed_port()
    sender = ZmqFrameSender(host="127.0.0.1", port=free)
    try:
        assert sender.endpoint == f"tcp://127.0.0.1:{free}"
    finally:
        sender.close()


@pytest.mark.parametrize(("level", "quiet"), [("ERROR", True), ("WARNING", False)])
def test_a_healthy_mooncake_start_is_silent_at_the_default_log_level(level: str, quiet: bool):
    from streamer.transport.mooncake import mooncake_available

    if not mooncake_available():
        pytest.skip("mooncake-transfer-engine is not importable")
    code = (
        "from streamer.transport.mooncake import MooncakeSender\n"
        "MooncakeSender(host='127.0.0.1').close()\nprint('started')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, "MC_LOG_LEVEL": level},
        check=False,
    )
    assert result.stdout.strip() == "started", result.stderr
    if quiet:
        assert result.stderr == ""
    else:
        assert "Local segment descriptor not found" in result.stderr


def test_a_stable_name_for_status_and_metrics_labels_comes_from_name_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
):
    from weightstream.cli import _client_config, _parser

    args = _parser().parse_args(["subscribe", "--name", "node-3/gpu-0"])
    assert _client_config(args).name == "node-3/gpu-0"
    monkeypatch.setenv("WEIGHTSTREAM_NAME", "node-4/gpu-1")
    args = _parser().parse_args(["publish", "--versions", "1"])
    assert _client_config(args).name == "node-4/gpu-1"
    monkeypatch.delenv("WEIGHTSTREAM_NAME")
    assert _client_config(_parser().parse_args(["subscribe"])).name == ""  # host:pid then
