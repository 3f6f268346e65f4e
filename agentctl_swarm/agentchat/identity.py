"""Ed25519 agent identities: generate, load, save atomically, sign the auth challenge.

Design note.  The identity file is a secret: ``save`` creates the temporary file
with ``O_CREAT|O_EXCL`` and mode 0600, so it is never readable by others even for
an instant (a umask can only remove bits), writes and fsyncs it, renames it over
the target and fsyncs the directory so the rename survives a crash.  The
``agent_id`` must equal the real server's, which hashes the PEM *string exactly
as sent*; therefore the PEM text read from a file is kept verbatim and never
re-serialised.  The file format is ``{"name", "pubkey", "privkey", "created"}``;
the real agentchat client also writes ``publicKey``/``privateKey``, which
``load`` accepts too.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agentctl_swarm.agentchat.protocol import auth_string, is_valid_name

log = logging.getLogger(__name__)

_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class IdentityError(Exception):
    """An identity file that cannot be used; the message names the file and the problem."""


def agent_id_for(pubkey_pem: str) -> str:
    """``@`` + the first 16 hex digits of SHA-256 of the PEM text (as the server does)."""
    return "@" + hashlib.sha256(pubkey_pem.encode("utf-8")).hexdigest()[:16]


def verify_auth(
    pubkey_pem: str, nonce: str, challenge_id: str, timestamp_ms: int, signature_b64: str
) -> bool:
    """True if ``signature_b64`` signs the auth string with this Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(pubkey_pem.encode("utf-8"))
        if not isinstance(key, Ed25519PublicKey):
            return False
        signature = base64.b64decode(signature_b64)
        key.verify(signature, auth_string(nonce, challenge_id, timestamp_ms).encode("utf-8"))
    except (ValueError, TypeError, binascii.Error, InvalidSignature):
        return False
    return True


def _utc_now_iso() -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, as JavaScript's toISOString()."""
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Identity:
    """One agent's name and Ed25519 key pair; the private key never appears in repr."""

    name: str
    pubkey_pem: str
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    created: str

    @classmethod
    def generate(cls, name: str) -> Identity:
        """A fresh key pair for ``name`` (which must be a valid agentchat name)."""
        if not is_valid_name(name):
            raise ValueError(f"invalid agent name {name!r}: expected 1-32 of [A-Za-z0-9_-]")
        key = Ed25519PrivateKey.generate()
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(name, pem.decode("ascii"), key, _utc_now_iso())

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read and check an identity file; IdentityError names the file and the fault."""
        data = _read_json(path)
        name = data.get("name")
        pub = data.get("pubkey", data.get("publicKey"))
        priv = data.get("privkey", data.get("privateKey"))
        if not is_valid_name(name):
            raise IdentityError(f"{path}: invalid or missing name {name!r}")
        if not isinstance(pub, str) or not isinstance(priv, str):
            raise IdentityError(f"{path}: missing pubkey or privkey")
        key = _load_private(path, priv)
        _check_pair(path, pub, key)
        _warn_if_exposed(path)
        return cls(name, pub, key, str(data.get("created") or ""))

    def save(self, path: Path) -> None:
        """Write atomically, mode 0600 from creation; parent directories made 0700."""
        path = Path(path)
        _make_private_dirs(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._file_bytes())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @cached_property
    def agent_id(self) -> str:
        """The id the server will assign: ``@`` + 16 hex of SHA-256(PEM)."""
        return agent_id_for(self.pubkey_pem)

    def sign_auth(self, nonce: str, challenge_id: str, timestamp_ms: int) -> str:
        """Base64 Ed25519 signature answering a CHALLENGE."""
        text = auth_string(nonce, challenge_id, timestamp_ms).encode("utf-8")
        return base64.b64encode(self.private_key.sign(text)).decode("ascii")

    def _file_bytes(self) -> bytes:
        priv = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        doc = {"name": self.name, "pubkey": self.pubkey_pem, "privkey": priv,
               "created": self.created}
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _read_json(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdentityError(f"{path}: identity file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{path}: cannot read identity file: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise IdentityError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise IdentityError(f"{path}: expected a JSON object")
    return data


def _load_private(path: Path, pem: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: privkey is not a PKCS#8 PEM key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: privkey is not an Ed25519 key")
    return key


def _check_pair(path: Path, pub_pem: str, key: Ed25519PrivateKey) -> None:
    """Refuse a file whose public key is not the private key's: it could never authenticate."""
    try:
        pub = serialization.load_pem_public_key(pub_pem.encode("utf-8"))
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: pubkey is not an SPKI PEM key: {exc}") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise IdentityError(f"{path}: pubkey is not an Ed25519 key")
    if pub.public_bytes(*_RAW) != key.public_key().public_bytes(*_RAW):
        raise IdentityError(f"{path}: pubkey does not match privkey")


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("identity file %s is accessible by others (mode %o)", path, mode & 0o777)


def _make_private_dirs(directory: Path) -> None:
    """mkdir -p where every directory created is 0700 (Path.mkdir gives parents 0777&~umask)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            os.mkdir(new, 0o700)
        except FileExistsError:
            pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
