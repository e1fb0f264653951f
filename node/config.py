"""Where the data dir is, and parsing/printing sizes."""
from __future__ import annotations

import os
import re
from pathlib import Path

from hypersdk.node.errors import UsageError


def default_data_dir() -> Path:
    env = os.environ.get("HYPERSDK_DATA_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "hypersdk"


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
          "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """'1M', '64KiB', '65536' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"cannot read size {text!r} (examples: 64K, 1M, 8MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90s', '30m', '1h', '7d' -> nanoseconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text or "")
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"cannot read duration {text!r} (examples: 30m, 1h, 7d)")
    return int(m.group(1)) * _DURATION[m.group(2)] * 10**9


def human(n: float) -> str:
    """Decimal units (MB = 10^6 bytes), as the benchmarks use."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# zstd level for new chunks. Measured on the 2 GiB benchmark image (2 cores):
# level 3 stores 2.2% less than level 2 but ingests 17% slower (1.88 s vs
# 1.60 s); level 1 stores 3% more again (675 MB vs 656 MB; restic 634 MB) for
# ~10% more speed (2.04-2.08 s vs 2.26-2.27 s, same minutes). Level 2 held the
# ">= 3x restic" ingest bar on 2026-11-24's machine and misses it on today's
# (2.72-2.88x; with O_DIRECT pack writes 2.82x/3.03x), level 1 with O_DIRECT
# clears it (3.16x sealed, 3.38x plain) and the store stays within 1.1x restic's
# (1.06x). Deltas use level >= 3 regardless (node/store/delta.py). BENCHMARKS.md.
DEFAULT_ZSTD_LEVEL = 1

DEFAULT_COMMIT_BYTES = 256 << 20


def commit_bytes() -> int:
    """New chunk bytes between durable index commits during a backup: the most
    work a crash can cost (HYPERSDK_COMMIT_BYTES, default 256M)."""
    text = os.environ.get("HYPERSDK_COMMIT_BYTES")
    if not text:
        return DEFAULT_COMMIT_BYTES
    n = parse_size(text)
    if n < 1:
        raise UsageError("HYPERSDK_COMMIT_BYTES must be at least 1 byte")
    return n


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds, not {text!r}") from None
    if not 0.1 <= v <= 86400 * 7:
        raise UsageError(f"{name} must be between 0.1 s and 7 days")
    return v


def audit_sync_interval() -> float:
    """Seconds between audit anti-entropy rounds (HYPERSDK_AUDIT_SYNC, default 30)."""
    return _seconds("HYPERSDK_AUDIT_SYNC", 30.0)


def audit_witness_interval() -> float:
    """Seconds between witness entries (HYPERSDK_AUDIT_WITNESS, default 600)."""
    return _seconds("HYPERSDK_AUDIT_WITNESS", 600.0)
