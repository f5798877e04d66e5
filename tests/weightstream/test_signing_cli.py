"""`--signing-key`, `--trust` and `--require-digests`: bad key files and flags say what to do."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest

from streamer.signing_keys import new_signing_key
from weightstream.cli import main

if TYPE_CHECKING:
    from pathlib import Path


def test_require_digests_without_trust_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main(["subscribe", "--require-digests"])
    assert exited.value.code == 2
    assert "--require-digests needs --trust KEYFILE" in capsys.readouterr().err


def test_unreadable_trust_and_signing_key_files_are_one_line_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    new_signing_key(tmp_path / "trainer.key", job="run-7")
    with caplog.at_level(logging.ERROR):
        assert main(["subscribe", "--trust", str(junk)]) == 1
        assert (
            main(["publish", "--version", "1", "--signing-key", str(tmp_path / "trainer.key.pub")])
            == 1
        )
    assert f"{junk}: no public key found (PEM, or 32 raw bytes)" in caplog.text
    assert "trainer.key.pub: not a readable unencrypted PEM private key" in caplog.text
