"""Secrets shown once: API tokens, share links, invitations.

Each is 32 random bytes (256 bits) in URL-safe base64 behind a short readable prefix. Only
the SHA-256 digest is stored: the secrets are random, so a fast hash is enough (a slow
password hash protects guessable secrets, which these are not), and a database dump reveals
nothing usable.
"""

import hashlib
import secrets

SECRET_BYTES = 32


def secret_new(prefix: str) -> tuple[str, str]:
    """(the secret to show once, its digest to store)."""
    plain = f"{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return plain, secret_digest(plain)


def secret_digest(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()
