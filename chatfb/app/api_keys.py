"""API keys: an admin issues one per user (`python -m chatfb api-key create USER`), and a program sends
it as `Authorization: Bearer KEY` to the OpenAI-compatible API (chatfb.ui.openai_api), chatting as that
user. The store keeps only each key's SHA-256 (keys are 256 random bits: no salt or slow hash needed),
so a copy of the database lets no one in; the key itself is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import secrets

from chatfb.store.db import Store

KEY_PREFIX = "cfb_"
SHOWN_CHARS = 10  # of a key, kept and listed to tell keys apart (KEY_PREFIX and 6 random characters)
MAX_USER_CHARS = 100


class ApiKeyError(ValueError):
    """A key request the admin must correct; str(e) says how."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def create_key(store: Store, user_name: str) -> dict:
    """A new key for `user_name`: {"id", "user_name", "prefix", "key"}; the key is not kept anywhere."""
    user_name = (user_name or "").strip()
    if not user_name or len(user_name) > MAX_USER_CHARS or not user_name.isprintable():
        raise ApiKeyError(f"a user name is 1 to {MAX_USER_CHARS} printable characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    kid = store.add_api_key(user_name, key_hash(key), key[:SHOWN_CHARS])
    return {"id": kid, "user_name": user_name, "prefix": key[:SHOWN_CHARS], "key": key}


def user_for_key(store: Store, key: str | None) -> str | None:
    """The user a live key belongs to, or None (no key, a wrong one, a revoked one)."""
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    return store.api_key_user(key_hash(key))
