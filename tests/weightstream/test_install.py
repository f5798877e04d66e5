"""What an installation gets right: the broker side loads no torch, and a foreign package
under one of our top-level names is reported (owner and fix) instead of crashing an import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs main() with the given arguments and reports whether torch got imported on the way.
_NO_TORCH = """
import sys
import weightstream.cli as cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


def _python(code: str, *args: str, path: list[Path], timeout_s: float = 60):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path)), "MC_LOG_LEVEL": "ERROR"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=path[0],  # `-c` puts the working directory first on sys.path
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["broker", "--help"],
        ["publish", "--help"],
        ["status", "--http", "http://127.0.0.1:9"],  # no broker there: exits 1, still no torch
        ["broker", "--endpoint", "tcp://127.0.0.1:0", "--http-port", "0", "--retention", "0"],
    ],
)
def test_broker_status_and_help_import_no_torch(args: list[str]):
    result = _python(_NO_TORCH, *args, path=[REPO])
    assert result.stdout.split()[-2:][0] == "NO-TORCH", result.stdout + result.stderr


def test_the_broker_serves_without_torch_importable(tmp_path: Path):
    # A directory named torch that fails on import stands in for "torch is not installed".
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    code = "import sys, weightstream.cli as c; sys.exit(c.main(sys.argv[1:]))"
    result = _python(code, "status", "--http", "http://127.0.0.1:9", path=[tmp_path, REPO])
    assert result.returncode == 1
    assert "is the broker running?" in result.stderr, result.stderr
    # publish does need torch, and says how to get it.
    result = _python(code, "publish", "--version", "1", path=[tmp_path, REPO])
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def _foreign_package(root: Path, name: str, distribution: str) -> None:
    """A package `name` installed by the unrelated distribution `distribution`."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("VERSION = 'not weightstream'\n")
    info = root / f"{distribution}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 9.9\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    (info / "RECORD").write_text(f"{name}/__init__.py,,\n")


def test_cli_names_the_distribution_that_took_one_of_our_package_names(tmp_path: Path):
    _foreign_package(tmp_path, "schemas", "schemas")
    code = "import sys, weightstream.cli as c; sys.exit(c.main(sys.argv[1:]))"
    # The foreign directory comes first on the path, as a pip install into site-packages would.
    result = _python(code, "status", path=[tmp_path, REPO])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'schemas' at" in lines[0]
    assert "belongs to the distribution schemas" in lines[0]
    assert "pip uninstall schemas" in lines[0]


def test_a_shadowing_directory_without_metadata_is_reported_too(tmp_path: Path):
    (tmp_path / "streamer").mkdir()
    (tmp_path / "streamer" / "__init__.py").write_text("")
    code = "import sys, weightstream.cli as c; sys.exit(c.main(sys.argv[1:]))"
    result = _python(code, "--help", path=[tmp_path, REPO])
    assert result.returncode == 1
    assert f"'streamer' resolves to {tmp_path / 'streamer'}" in result.stderr
    assert "remove that directory from sys.path" in result.stderr


def test_our_own_tree_passes_the_check():
    result = _python(
        "from weightstream.names import check_top_level_names; check_top_level_names(); print('ok')",
        path=[REPO],
    )
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    "call", ["p.register_backend()", "p.WeightstreamEndpoint"], ids=["general", "endpoint"]
)
def test_vllm_entry_points_name_the_foreign_package_before_importing_ours(
    tmp_path: Path, call: str
):
    # What vLLM's plugin loader runs for our `vllm.general_plugins` / `vllm.endpoint_plugins`.
    _foreign_package(tmp_path, "streamer", "streamer")
    code = f"""
import weightstream.vllm_plugins as p
from weightstream.names import ForeignPackage
try:
    {call}
except ForeignPackage as exc:
    print("REFUSED", exc)
"""
    result = _python(code, path=[tmp_path, REPO])
    assert result.stdout.startswith("REFUSED"), result.stdout + result.stderr
    assert "belongs to the distribution streamer" in result.stdout
    assert "pip uninstall streamer" in result.stdout
