"""Deterministic seeds derived from (seed, step, ...) so that randomness never depends on what ran before."""
from __future__ import annotations

import hashlib


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on the integers `parts` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
