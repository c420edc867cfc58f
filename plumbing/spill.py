"""Content-addressed files for bytes too large to travel inside another record."""

from __future__ import annotations

import os
from pathlib import Path


def spill(root: Path, data: bytes, sha256_hex: str) -> Path:
    """Write `data` to `root/<first 2 hex>/<sha256>` once (atomically) and return the absolute path.

    Content addressing makes a redelivered record's second spill a no-op and lets a
    reader check what it got against the letter's `payload_sha256`.
    """
    path = (root / sha256_hex[:2] / sha256_hex).resolve()
    if path.exists() and path.stat().st_size == len(data):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_spilled(ref: str) -> bytes:
    """The bytes a letter's `payload_ref` or `headers_ref` names (on the host that wrote it)."""
    return Path(ref).read_bytes()
