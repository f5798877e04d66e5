"""Our top-level package names, and a check that no other distribution took one of them.

weightstream installs several top-level packages (`schemas`, `streamer`, ...), and PyPI has
unrelated packages with some of those names: installing one shadows ours, or overwrites files
of ours in site-packages, and the first `import schemas` then fails far from the cause. The CLI
and the vLLM plugin entry points call `check_top_level_names()` before importing anything of
ours, so the user reads which distribution owns the name and what to do.

Standard library only, and it raises its own error type instead of one from `streamer.errors`:
the package it would import is exactly what may be broken.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DISTRIBUTION", "TOP_LEVEL", "ForeignPackage", "check_top_level_names", "foreign_owner"]

DISTRIBUTION = "weightstream"
TOP_LEVEL = ("schemas", "streamer", "publishers", "subscribers", "gpu", "weightstream")


class ForeignPackage(ImportError):
    """A top-level name of ours resolves to another distribution's package."""


def _root() -> Path:
    """The directory our packages are installed in (the one holding `weightstream/`)."""
    return Path(__file__).resolve().parent.parent


def foreign_owner(name: str, distributions: Mapping[str, list[str]] | None = None) -> str | None:
    """What `import name` would give instead of our package, or None when it gives ours.

    `distributions` is `packages_distributions()` (slow in a large environment: pass it once).
    """
    if distributions is None:
        distributions = packages_distributions()
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a broken package under that name: report its owners
        spec = None
    ours = _root() / name
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    location = Path(next(iter(locations))).resolve() if locations else None
    if not ours.is_dir() and location != ours:
        return None  # a package we do not ship in this installation (e.g. `gpu`): not ours to judge
    owners = sorted(set(distributions.get(name, [])) - {DISTRIBUTION})
    if owners:
        return f"{name!r} at {location or ours} belongs to the distribution {' and '.join(owners)}"
    if location != ours:
        return f"{name!r} resolves to {location or 'a non-package'}, not to weightstream's {ours}"
    return None


def check_top_level_names() -> None:
    """Raise ForeignPackage naming the owner and the fix, if any name of ours is taken."""
    distributions = packages_distributions()
    problems = [p for n in TOP_LEVEL if (p := foreign_owner(n, distributions)) is not None]
    if not problems:
        return
    owners = sorted({d for n in TOP_LEVEL for d in distributions.get(n, []) if d != DISTRIBUTION})
    fix = (
        f"`pip uninstall {' '.join(owners)}` then `pip install --force-reinstall weightstream`"
        if owners
        else "remove that directory from sys.path (PYTHONPATH, the current directory)"
    )
    raise ForeignPackage(
        f"another package took a top-level name weightstream needs: {'; '.join(problems)}. "
        f"Fix: {fix}, or install weightstream in a virtual environment of its own"
    )
