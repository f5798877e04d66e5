"""Publisher signing keys (Ed25519) and the keys a subscriber trusts, and their files.

    new_signing_key("trainer.key", job="run-7")   -> trainer.key (secret, 0600), trainer.key.pub
    load_signing_key("trainer.key")               -> SigningKey   (Publisher(signing_key=...))
    load_trusted_keys(["trainer.key.pub", ...])   -> TrustedKeys  (Subscriber(trusted_keys=...))

Files are PEM (PKCS8 private keys, SubjectPublicKeyInfo public keys), each block optionally
headed by a `# ...; job=NAME` comment that pins the key to a trainer job; several public keys
may share a file (`cat a.pub b.pub`). Raw 32-byte Ed25519 keys are read too (no job).
A key is named by its id: `ed25519:` and 16 bytes of the SHA-256 of the raw public key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from streamer.signing import verify_manifest

if TYPE_CHECKING:
    from collections.abc import Iterable

    from schemas.manifest import Manifest

__all__ = [
    "PublicKey",
    "SigningKey",
    "TrustedKeys",
    "key_id",
    "load_signing_key",
    "load_trusted_keys",
    "new_signing_key",
]

logger = logging.getLogger(__name__)

_RAW_KEY_BYTES = 32
_JOB = re.compile(r"[A-Za-z0-9._/-]*")


def key_id(public: Ed25519PublicKey) -> str:
    """`ed25519:` and the first 16 bytes of the SHA-256 of the raw public key, in hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class PublicKey:
    """A publisher's public key; `job` pins it to one trainer job (None: any job it claims)."""

    key: Ed25519PublicKey
    job: str | None = None
    source: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    def pem(self) -> str:
        """The key as a PEM block, headed by its job if pinned (the format `load_trusted_keys` reads)."""
        block = self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        job = f"; job={self.job}" if self.job is not None else ""
        return f"# weightstream publisher key {self.key_id}{job}\n{block}"


@dataclass(frozen=True)
class SigningKey:
    """A trainer's Ed25519 private key and the job it signs for."""

    private: Ed25519PrivateKey
    job: str = ""

    def __post_init__(self) -> None:
        if not _JOB.fullmatch(self.job) or len(self.job) > 200:
            raise ValueError(f"job {self.job!r}: use at most 200 of A-Z a-z 0-9 . _ / -")

    @classmethod
    def generate(cls, *, job: str = "") -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), job)

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())

    def public(self) -> PublicKey:
        return PublicKey(self.private.public_key(), job=self.job)

    def pem(self) -> str:
        block = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return f"# weightstream signing key {self.key_id}; job={self.job}; keep it secret\n{block}"


def new_signing_key(path: str | os.PathLike[str], *, job: str) -> SigningKey:
    """Make a key pair: `path` (private, mode 0600) and `path.pub` (give that to subscribers).

    Refuses to overwrite an existing key.
    """
    key = SigningKey.generate(job=job)
    private = Path(path)
    public = private.with_name(private.name + ".pub")
    for target in (private, public):
        if target.exists():
            raise ValueError(f"{target} exists; remove it first or choose another path")
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(key.pem())
    public.write_text(key.public().pem())
    logger.info("signing key made key_id=%s job=%s public=%s", key.key_id, job, public)
    return key


def _blocks(text: str) -> list[tuple[str | None, bytes]]:
    """PEM blocks of a file, each with the `job=` of the comment line before it, if any."""
    blocks: list[tuple[str | None, bytes]] = []
    job: str | None = None
    current: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and stripped.startswith("#"):
            fields = dict(
                part.strip().split("=", 1) for part in stripped[1:].split(";") if "=" in part
            )
            job = fields.get("job", job)
        elif stripped.startswith("-----BEGIN "):
            current = [stripped]
        elif current is not None:
            current.append(stripped)
            if stripped.startswith("-----END "):
                blocks.append((job, "\n".join(current).encode()))
                current, job = None, None
    return blocks


def load_signing_key(path: str | os.PathLike[str], *, job: str | None = None) -> SigningKey:
    """Read a private key (PEM PKCS8, or a raw 32-byte seed); `job` overrides the file's."""
    data = Path(path).read_bytes()
    if len(data) == _RAW_KEY_BYTES:
        return SigningKey(Ed25519PrivateKey.from_private_bytes(data), job or "")
    blocks = _blocks(data.decode(errors="replace"))
    if len(blocks) != 1:
        raise ValueError(f"{path}: expected one PEM private key block, found {len(blocks)}")
    file_job, pem = blocks[0]
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"{path}: holds a {type(private).__name__}, not an Ed25519 key")  # noqa: TRY004 (a bad file, not a bad argument)
    return SigningKey(private, job if job is not None else (file_job or ""))


def _public_keys(path: Path) -> list[PublicKey]:
    data = path.read_bytes()
    if len(data) == _RAW_KEY_BYTES:
        return [PublicKey(Ed25519PublicKey.from_public_bytes(data), source=str(path))]
    keys: list[PublicKey] = []
    for job, pem in _blocks(data.decode(errors="replace")):
        try:
            public = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: a block is not a readable PEM public key ({exc})") from exc
        if not isinstance(public, Ed25519PublicKey):
            raise ValueError(f"{path}: holds a {type(public).__name__}, not an Ed25519 key")  # noqa: TRY004
        keys.append(PublicKey(public, job=job, source=str(path)))
    if not keys:
        raise ValueError(f"{path}: no public key found (PEM, or 32 raw bytes)")
    return keys


class TrustedKeys:
    """The publisher keys a subscriber trusts, by key id.

    >>> trusted = load_trusted_keys(["trainer.key.pub"])  # doctest: +SKIP
    >>> trusted.verify(manifest, require_digests=True)  # doctest: +SKIP
    """

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self.keys: dict[str, PublicKey] = {key.key_id: key for key in keys}
        if not self.keys:
            raise ValueError("no trusted keys given: a subscriber that verifies needs at least one")

    @classmethod
    def of(cls, *keys: PublicKey) -> TrustedKeys:
        return cls(keys)

    def verify(self, manifest: Manifest, *, require_digests: bool = False) -> None:
        verify_manifest(manifest, self.keys, require_digests=require_digests)

    def describe(self) -> str:
        return ", ".join(
            f"{k}" + (f" ({v.source})" if v.source else "") for k, v in self.keys.items()
        )


def load_trusted_keys(paths: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
    """Read publisher public keys from files (PEM blocks, several per file allowed, or raw)."""
    return TrustedKeys(key for path in paths for key in _public_keys(Path(path)))
