"""Replication windows and the carbon signal (node/replicas/windows.py), and the
repair bandwidth bound (node/replicas/pace.py) on trio's virtual clock."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
import trio

from hypersdk.node.errors import UsageError
from hypersdk.node.replicas.pace import Pace, PacedSink
from hypersdk.node.replicas.windows import Windows, in_span, parse_signal, parse_span


def test_spans_parse_and_run_over_midnight():
    assert parse_span("22:00-06:00") == (1320, 360) and parse_span("9:05-17:30") == (545, 1050)
    for bad in ("22:00", "24:00-01:00", "10:00-10:00", "1:2-3:4", "a-b"):
        with pytest.raises(UsageError):
            parse_span(bad)
    night = (1320, 360)
    assert in_span(night, 23 * 60) and in_span(night, 0) and in_span(night, 359)
    assert not in_span(night, 360) and not in_span(night, 12 * 60)
    day = (545, 1050)
    assert in_span(day, 545) and not in_span(day, 1050) and not in_span(day, 0)


@pytest.mark.parametrize("raw, value", [
    (b"212\n", 212.0), (b'{"intensity": 88}', 88.0), (b'{"carbonIntensity": 1.5}', 1.5),
    (b'{"data": [{"intensity": {"forecast": 120, "actual": 131, "index": "moderate"}}]}',
     131.0),
    (b'{"data": [{"intensity": {"forecast": 120, "actual": null}}]}', 120.0),
])
def test_signal_formats(raw, value):
    assert parse_signal(raw) == value


@pytest.mark.parametrize("raw", [b"", b"high", b'{"intensity": "88"}', b"[1]",
                                 b'{"intensity": true}'])
def test_signals_without_a_number_are_refused(raw):
    with pytest.raises(ValueError):
        parse_signal(raw)


def test_windows_follow_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        t = 1_800_000_000 - 1_800_000_000 % 86400          # midnight UTC
        w = Windows([parse_span("22:00-06:00")], clock=lambda: now)
        now = t + 3 * 3600
        assert w.state() == (True, "")
        now = t + 12 * 3600
        ok, why = w.state()
        assert not ok and "outside the replication window (22:00-06:00" in why
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_carbon_signal_from_a_file_and_from_a_url(tmp_path):
    f = tmp_path / "carbon"
    f.write_text("300")
    w = Windows(carbon_source=str(f), carbon_max=200)
    assert w.state() == (False, "carbon intensity 300 is above the limit 200")
    f.write_text('{"intensity": 150}  ')                     # changed: read again at once
    assert w.state() == (True, "carbon intensity 150")
    f.unlink()
    ok, why = w.state()                                      # unreadable: replicate anyway
    assert ok and "unreadable" in why

    body = {"v": json.dumps({"data": [{"intensity": {"actual": 420}}]}).encode()}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body["v"])

        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        clock = [0.0]
        u = Windows(carbon_source=f"http://127.0.0.1:{srv.server_port}/now", carbon_max=400,
                    clock=lambda: clock[0])
        assert u.state() == (False, "carbon intensity 420 is above the limit 400")
        body["v"] = b"380"
        assert u.state()[0] is False                          # a URL: once a minute
        clock[0] += 61
        assert u.state() == (True, "carbon intensity 380")
    finally:
        srv.shutdown()


async def test_pace_bounds_the_rate_with_one_second_of_burst(autojump_clock):
    p = Pace(1 << 20)
    t0 = trio.current_time()
    for _ in range(40):
        await p.take(256 << 10)                               # 10 MiB in quarters
    took = trio.current_time() - t0
    assert 9.0 - 1e-6 <= took <= 10.0 and p.bytes == 10 << 20

    class Sink:
        def __init__(self):
            self.got = []

        async def put(self, cid, plain, wire=None):
            self.got.append(cid)

        async def put_many(self, items):
            self.got += [c for c, _, _ in items]

        def begin(self):
            return "begun"
    s = Sink()
    paced = PacedSink(s, Pace(1 << 20))
    t0 = trio.current_time()
    await paced.put(b"a", b"x" * (3 << 20))
    await paced.put_many([(b"b", b"", (0, 0, b"y" * (1 << 20)))])
    assert s.got == [b"a", b"b"] and paced.begin() == "begun"
    assert trio.current_time() - t0 >= 3.0 - 1e-6
