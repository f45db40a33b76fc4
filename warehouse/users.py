"""User identity: the only place a raw username is turned into a userHash.

ImageGem's release carries ``userHash`` (64 lowercase hex chars). Anything else in that
column — a raw username from a crawl or an unhashed export — is replaced at landing time by
``sha256(salt || username)``, so no raw username is ever written to the lake.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from warehouse.schema import USER_HASH_PATTERN

_IS_HASH = re.compile(USER_HASH_PATTERN)
USERNAME_KEYS = ("username",)


def salted_user_hash(username: str, salt: str) -> str:
    """The userHash of a raw username: SHA-256 of salt + username (trimmed), lowercase hex."""
    return hashlib.sha256((salt + username.strip()).encode("utf-8")).hexdigest()


def normalize_user_hashes(values: pa.Array, salt: str) -> tuple[pa.Array, int]:
    """Lower-cased hashes kept; raw usernames hashed with ``salt``; blanks become null.

    Returns the new array and how many raw usernames were hashed. The common case (every value
    already a hash) is vectorised; only the raw usernames go through Python.
    """
    if not salt:
        raise ValueError("a non-empty salt is required to hash raw usernames")
    trimmed = pc.utf8_lower(pc.utf8_trim_whitespace(values))
    is_hash = pc.match_substring_regex(trimmed, USER_HASH_PATTERN)
    is_blank = pc.equal(trimmed, "")
    raw_mask = pc.and_(pc.invert(is_hash), pc.invert(is_blank)).fill_null(False)
    n_raw = pc.sum(raw_mask).as_py() or 0
    out = pc.if_else(is_blank, pa.scalar(None, pa.string()), trimmed)
    if n_raw:
        originals = values.to_pylist()
        hashed = [
            salted_user_hash(v, salt) if raw else None
            for v, raw in zip(originals, raw_mask.to_pylist(), strict=True)
        ]
        out = pc.if_else(raw_mask, pa.array(hashed, pa.string()), out)
    return out, n_raw


def pseudonymize(value: str, salt: str) -> str:
    """A hash stays (lower-cased); anything else is salted-hashed."""
    text = value.strip().lower()
    return text if _IS_HASH.match(text) else salted_user_hash(value, salt)


def _walk(node: Any, salt: str) -> Any:
    if isinstance(node, dict):
        return {
            k: pseudonymize(v, salt)
            if k in USERNAME_KEYS and isinstance(v, str) and v.strip()
            else _walk(v, salt)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_walk(v, salt) for v in node]
    return node


def pseudonymize_body(body: str | None, salt: str) -> str | None:
    """An API answer body with every ``username`` value replaced by its userHash.

    Bodies that are not JSON (HTML error pages, truncated answers) are kept as they are: they
    are quarantined downstream, and carry no parsed user field.
    """
    if not body or "username" not in body:
        return body
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    return json.dumps(_walk(payload, salt), ensure_ascii=False, separators=(",", ":"))
