"""The broker's state file on disk: checked at start, written atomically, read with care.

    StateFile(dir).check()      the directory exists (made if not) and takes a write, or
                                StateError naming the path and the fix
    StateFile.read()            bytes, or None; a damaged file is the caller's to report
    StateFile.write(data)       tmp file, fsync, rename over the old one, fsync the directory:
                                a crash leaves the old file or the new one, never half of one
    StateFile.quarantine()      move a damaged file aside (`--discard-bad-state`)

OSError is translated here, once, into `StateError` (chained), with the path in the message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from streamer.errors import StreamerError

__all__ = ["STATE_FILE", "StateError", "StateFile"]

STATE_FILE = "registry.msgpack"


class StateError(StreamerError):
    """The broker cannot read or write its state file; the message says what to do."""


class StateFile:
    def __init__(self, state_dir: str | os.PathLike[str], name: str = STATE_FILE) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / name
        self._tmp = self.dir / f"{name}.tmp"

    def check(self) -> None:
        """Make the directory if needed and prove a write (and its fsync) works there."""
        probe = self.dir / ".write-test"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with probe.open("wb") as file:
                file.write(b"ok")
                file.flush()
                os.fsync(file.fileno())
            probe.unlink()
        except OSError as exc:
            raise StateError(
                f"state dir {self.dir} is not usable ({exc.strerror or exc}): make it a writable "
                "directory (mkdir -p, chown/chmod to the broker's user, free some space), point "
                "--state-dir elsewhere, or run without --state-dir (versions then do not survive "
                "a restart)"
            ) from exc

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(
                f"cannot read state file {self.path} ({exc.strerror or exc}): fix its "
                "permissions, or move it aside to start empty"
            ) from exc

    def write(self, data: bytes) -> None:
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._tmp, self.path)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(
                f"cannot write state file {self.path} ({exc.strerror or exc}): free space or "
                "fix permissions there; the broker keeps serving and retries"
            ) from exc

    def quarantine(self) -> Path:
        """Move the state file aside; returns where it went."""
        aside = self.path.with_name(f"{STATE_FILE}.bad-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            raise StateError(f"cannot move {self.path} aside ({exc.strerror or exc})") from exc
        return aside

    def damaged(self, exc: Exception) -> StateError:
        """The error for a state file that does not decode."""
        return StateError(
            f"state file {self.path} is damaged ({exc}): move it aside "
            f"(mv {self.path} {self.path}.bad) to start empty, or start the broker with "
            "--discard-bad-state to do that for you (the versions it held are then forgotten; "
            "trainers publish new ones)"
        )
