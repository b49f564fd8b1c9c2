"""Deterministic seeds derived from (seed, step, ...) so that randomness never depends on what ran before."""
from __future__ import annotations

import hashlib


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on the integers `parts` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def run_seed(seed: int, index: int) -> int:
    """train.seed of run `index` of a family of runs (TDC: fine-tune of group i, -1 for the continued baseline):
    31 bits of derive_seed(seed, index)."""
    return derive_seed(seed, index) % 2**31
