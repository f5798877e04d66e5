"""vLLM's general plugin says so when WEIGHTSTREAM_* asks a server to follow but VLLM_PLUGINS
leaves out the endpoint plugin: unset, vLLM loads every general plugin (ours too) but no
endpoint plugin. (A VLLM_PLUGINS that lists other plugins only loads none of ours: the engine
then fails to start on the unknown backend, in vLLM's words; docs/vllm.md says what to set.)"""

from __future__ import annotations

import logging
import warnings

import pytest

with warnings.catch_warnings():  # vLLM's own imports warn; pytest turns warnings into errors
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")
    from weightstream.vllm_plugins import register_backend

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.parametrize(
    ("plugins", "warned"),
    [(None, True), ("weightstream", False), ("lora_filesystem_resolver,weightstream", False)],
)  # fmt: skip
def test_a_forgotten_vllm_plugins_is_reported_with_what_to_set(
    plugins: str | None,
    warned: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WEIGHTSTREAM_MODEL", "llama")
    if plugins is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", plugins)
    with caplog.at_level(logging.WARNING, logger="weightstream"):
        register_backend()  # as vLLM's loader calls it, in the process the user started
    hints = [r.getMessage() for r in caplog.records if "VLLM_PLUGINS" in r.getMessage()]
    assert bool(hints) is warned, hints
    if warned:
        assert "start it with VLLM_PLUGINS=weightstream" in hints[0]


def test_no_hint_without_weightstream_variables(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WEIGHTSTREAM_MODEL", raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    with caplog.at_level(logging.WARNING, logger="weightstream"):
        register_backend()
    assert not [r for r in caplog.records if "VLLM_PLUGINS" in r.getMessage()]
