"""A following vLLM engine reads the publisher keys it trusts from WEIGHTSTREAM_TRUST."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import pytest

with warnings.catch_warnings():  # vLLM's own imports warn; pytest turns warnings into errors
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")
    from subscribers.vllm.follow import FollowConfig

from streamer.signing_keys import new_signing_key

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.vllm]


def test_follow_config_reads_the_trusted_keys(tmp_path: Path) -> None:
    first = new_signing_key(tmp_path / "a.key", job="run-7")
    second = new_signing_key(tmp_path / "b.key", job="run-7")
    trust = f"{tmp_path / 'a.key.pub'},{tmp_path / 'b.key.pub'}"
    config = FollowConfig.from_env({"WEIGHTSTREAM_MODEL": "m", "WEIGHTSTREAM_TRUST": trust})
    trusted = config.trusted_keys()
    assert trusted is not None
    assert set(trusted.keys) == {first.key_id, second.key_id}
    assert FollowConfig(model="m").trusted_keys() is None
    (tmp_path / "junk.pub").write_text("junk\n")
    with pytest.raises(ValueError, match="no public key found"):
        FollowConfig(model="m", trust=str(tmp_path / "junk.pub")).trusted_keys()
