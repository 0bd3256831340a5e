"""OpenSSH public keys: parsed, checked and fingerprinted before anything is enqueued."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

# Key types every provider of ours accepts; DSA is refused by modern OpenSSH and by AWS/Azure.
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
MIN_RSA_BITS = 2048


def _read_string(blob: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(blob):
        raise ValueError("the key body is truncated")
    (length,) = struct.unpack(">I", blob[offset : offset + 4])
    end = offset + 4 + length
    if end > len(blob):
        raise ValueError("the key body is truncated")
    return blob[offset + 4 : end], end


class SSHPublicKey(BaseModel):
    """One OpenSSH public key line, e.g. ``ssh-ed25519 AAAAC3Nza... alice@laptop``."""

    model_config = ConfigDict(frozen=True)

    key_type: str
    body: str  # base64, exactly as given
    comment: str = ""

    @property
    def openssh(self) -> str:
        """The key as one authorized_keys line (no trailing newline)."""
        return " ".join(p for p in (self.key_type, self.body, self.comment) if p)

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.body)

    @property
    def md5_fingerprint(self) -> str:
        """Colon-hex MD5, the form Hetzner and DigitalOcean index keys by (``ssh-keygen -E md5``)."""
        digest = hashlib.md5(self.blob, usedforsecurity=False).hexdigest()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    @property
    def sha256_fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str) -> SSHPublicKey:
        parts = text.strip().split(None, 2)
        if len(parts) < 2:
            raise ValueError(
                "expected an OpenSSH public key line '<type> <base64> [comment]', "
                "such as the contents of ~/.ssh/id_ed25519.pub"
            )
        key_type, body = parts[0], parts[1]
        if key_type not in KEY_TYPES:
            if "PRIVATE KEY" in text:
                raise ValueError("this is a private key; pass the public key (the .pub file)")
            raise ValueError(f"unsupported key type {key_type!r}; allowed: {', '.join(KEY_TYPES)}")
        try:
            blob = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the key body is not valid base64") from None
        inner_type, offset = _read_string(blob, 0)
        if inner_type.decode(errors="replace") != key_type:
            raise ValueError(f"the key body encodes {inner_type.decode(errors='replace')!r}, not {key_type!r}")
        if key_type == "ssh-rsa":
            _exponent, offset = _read_string(blob, offset)
            modulus, offset = _read_string(blob, offset)
            bits = int.from_bytes(modulus, "big").bit_length()
            if bits < MIN_RSA_BITS:
                raise ValueError(f"RSA key of {bits} bits is too short; use at least {MIN_RSA_BITS}")
        elif key_type == "ssh-ed25519":
            point, offset = _read_string(blob, offset)
            if len(point) != 32:
                raise ValueError("an ssh-ed25519 key body must hold a 32-byte public key")
        comment = parts[2].strip() if len(parts) == 3 else ""
        return cls(key_type=key_type, body=body, comment=comment)


def _coerce(value: object) -> object:
    if isinstance(value, str):
        return SSHPublicKey.parse(value)
    return value


# Accepts a key line (str) or an already parsed key wherever a model field needs one.
SSHKeyField = Annotated[SSHPublicKey, BeforeValidator(_coerce)]


def throwaway_public_key(comment: str = "vmq-demo") -> str:
    """A well-formed ed25519 public key line whose private half exists nowhere: nobody can log in
    with it. For the demo and tests, where a VM needs a key but no one will ever use it."""
    import os

    def field(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    blob = field(b"ssh-ed25519") + field(os.urandom(32))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"
