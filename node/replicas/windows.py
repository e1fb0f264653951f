"""When replication traffic may flow: time-of-day windows and a carbon signal.

    node run --replicate-window 22:00-06:00 [--replicate-window 12:00-13:00]
    node run --carbon-signal FILE|URL --carbon-max 200

Windows are in the node's local time (TZ); a window whose end is before its start
runs over midnight. With a carbon signal, replication runs only while the signal's
value (grams CO2e per kWh, as grid operators publish it) is at most --carbon-max.
The signal is a file or an http(s) URL the user names (a URL is read at most once
a minute, a file again whenever it changes):
a bare number, or JSON with the number under "intensity", "carbon_intensity" or
"carbonIntensity", or the UK grid API's shape ({"data": [{"intensity": {"actual":
N, "forecast": M}}]}). A signal that cannot be read does not stop replication
(its copies are what protects the data; `status` says the signal is unreadable).

Outside a window, or above the carbon limit, placement asks nobody and holders
fetch nothing: the work waits in the queue. Health checks and releases go on
(a few KB each).
"""
from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field

from hypersdk.node import runtime
from hypersdk.node.errors import UsageError

MAX_SIGNAL = 1 << 20
READ_EVERY_S = 60.0
_SPAN = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)-([01]?\d|2[0-3]):([0-5]\d)$")


def parse_span(text: str) -> tuple[int, int]:
    """'22:00-06:00' -> (1320, 360) minutes of the day; UsageError otherwise."""
    m = _SPAN.match(text.strip())
    if not m or m.group(1, 2) == m.group(3, 4):
        raise UsageError(f"--replicate-window {text!r}: expected HH:MM-HH:MM (e.g. "
                         "22:00-06:00), start and end different")
    h1, m1, h2, m2 = map(int, m.groups())
    return h1 * 60 + m1, h2 * 60 + m2


def in_span(span: tuple[int, int], minute: int) -> bool:
    a, b = span
    return a <= minute < b if a < b else minute >= a or minute < b


def parse_signal(raw: bytes) -> float:
    """The carbon intensity a signal's bytes hold; ValueError if none."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        return float(text)
    except ValueError:
        pass
    doc = json.loads(text)
    if isinstance(doc, dict):
        for k in ("intensity", "carbon_intensity", "carbonIntensity"):
            if isinstance(doc.get(k), (int, float)) and not isinstance(doc.get(k), bool):
                return float(doc[k])
        data = doc.get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict):
            inner = data[0].get("intensity")
            if isinstance(inner, dict):
                for k in ("actual", "forecast"):
                    if isinstance(inner.get(k), (int, float)) and not isinstance(inner.get(k), bool):
                        return float(inner[k])
    raise ValueError("no carbon intensity in the signal")


def read_signal(source: str) -> float:
    """Read the signal now (a file or an http(s) URL, 5 s timeout)."""
    if source.startswith(("http://", "https://")):
        import urllib.request
        with urllib.request.urlopen(source, timeout=5) as r:      # noqa: S310 (user's URL)
            raw = r.read(MAX_SIGNAL + 1)
    else:
        with open(source, "rb") as f:
            raw = f.read(MAX_SIGNAL + 1)
    if len(raw) > MAX_SIGNAL:
        raise ValueError("the signal is larger than 1 MiB")
    return parse_signal(raw)


@dataclass
class Windows:
    spans: list = field(default_factory=list)      # [(start, end) minutes]
    carbon_source: str | None = None
    carbon_max: float | None = None
    clock: object = runtime.now
    _read_at: float = -1e18
    _value: float | None = None
    _error: str = ""
    _stamp: object = None

    def _carbon(self) -> tuple[float | None, str]:
        now = self.clock()
        stamp = None
        if not self.carbon_source.startswith(("http://", "https://")):
            try:                                    # a file: read again when it changes
                st = os.stat(self.carbon_source)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                stamp = "missing"
        if now - self._read_at >= READ_EVERY_S or stamp != self._stamp:
            self._read_at, self._stamp = now, stamp
            try:
                self._value, self._error = read_signal(self.carbon_source), ""
            except (OSError, ValueError) as exc:
                self._value, self._error = None, f"carbon signal unreadable: {exc}"
        return self._value, self._error

    def state(self) -> tuple[bool, str]:
        """(may replication traffic flow now, why or why not)."""
        if self.spans:
            t = datetime.datetime.fromtimestamp(self.clock())
            minute = t.hour * 60 + t.minute
            if not any(in_span(s, minute) for s in self.spans):
                shown = ", ".join(f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}"
                                  for a, b in self.spans)
                return False, f"outside the replication window ({shown} local time)"
        if self.carbon_source is not None:
            value, error = self._carbon()
            if value is None:
                return True, error + " (replicating anyway)"
            if self.carbon_max is not None and value > self.carbon_max:
                return False, (f"carbon intensity {value:g} is above the limit "
                               f"{self.carbon_max:g}")
            return True, f"carbon intensity {value:g}"
        return True, ""
