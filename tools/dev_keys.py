"""The local suite's development issuer: one Ed25519 signing key, made when missing.

`make run` and `make token` share it through `.run/keys/` (or `<dir>`): `signing.jwk` is the
private key (mode 0600, only the tools that mint read it), `public.jwks` the key set every
service gets as JWT_PUBLIC_KEYS_FILE. In production the platform's issuer holds the private
key and `deploy/` carries only the public key set.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.kit.auth import SigningKey, key_set_json

ROOT = Path(__file__).resolve().parent.parent
DEV_KEYS_DIR = ROOT / ".run" / "keys"
SIGNING_KEY_FILE = "signing.jwk"
PUBLIC_KEYS_FILE = "public.jwks"


def dev_signing_key(keys_dir: Path = DEV_KEYS_DIR) -> SigningKey:
    """The development signing key under `keys_dir`, made (with its key set) if missing."""
    private = keys_dir / SIGNING_KEY_FILE
    if private.exists():
        key = SigningKey.from_jwk(private.read_text())
    else:
        key = SigningKey.generate(kid="dev-1")
        keys_dir.mkdir(parents=True, exist_ok=True)
        partial = private.with_name(f".{private.name}.partial")
        partial.write_text(key.to_jwk())
        os.chmod(partial, 0o600)
        os.replace(partial, private)
    public = keys_dir / PUBLIC_KEYS_FILE
    if not public.exists():
        public.write_text(key_set_json([key]) + "\n")
    return key


def dev_public_keys_file(keys_dir: Path = DEV_KEYS_DIR) -> Path:
    """The key set file of the development key (made with it if missing)."""
    dev_signing_key(keys_dir)
    return keys_dir / PUBLIC_KEYS_FILE


def signing_key_from_env(keys_dir: Path = DEV_KEYS_DIR) -> SigningKey:
    """JWT_SIGNING_KEY_FILE (a private JWK) when set, else the development key: what the
    tools that mint tokens (token, seed, chaos) sign with."""
    path = os.environ.get("JWT_SIGNING_KEY_FILE")
    if path:
        return SigningKey.from_jwk(Path(path).read_text())
    return dev_signing_key(keys_dir)
