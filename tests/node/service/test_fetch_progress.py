"""What a fetch and a network restore tell their user, with real `hypersdk node run`
processes on 127.0.0.1: the fetch's progress bar reaches its total (its advances
count the same unit as its total: plaintext bytes, also for chunks that cross the
wire compressed), a terminal shows it at 100% with bytes and speed, and the summary
of a network restore covers the whole restore, fetch included, at a rate that is
its bytes over its seconds.

Every wait is bounded (subprocess timeouts, polls with deadlines)."""
from __future__ import annotations

import json
import re

from conftest import Cli, cli_env, mixed_image, same_bytes
from test_node_cli import nodes, poll  # noqa: F401  (fixture)
from test_progress import _run_on_pty

from hypersdk.node.daemon.control import call

CS = 1 << 20
_UNIT = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _providers(node, mid):
    poll(lambda: node.cli.json("dht", "find", mid)["providers"], 30,
         f"a provider of {mid[:12]}", interval=0.2)


def _distinct_bytes(img) -> int:
    """Plaintext bytes of the image's distinct non-zero chunks (what a fetch needs)."""
    data = img.read_bytes()
    chunks = {data[i:i + CS] for i in range(0, len(data), CS)}
    return sum(len(c) for c in chunks if c.count(0) != len(c))


def _bars(events) -> list[tuple[str, int, int]]:
    """(label, total, sum of advances) of each bar in a control event stream."""
    out, cur = [], None
    for ev in events:
        t = ev.get("t")
        if t == "bar":
            cur = [str(ev["label"]), int(ev["total"]), 0]
        elif t == "adv":
            assert cur is not None, "an advance outside a bar"
            cur[2] += int(ev["n"])
        elif t == "end":
            assert cur is not None
            out.append(tuple(cur))
            cur = None
    assert cur is None, "a bar that never ended"
    return out


def test_fetch_progress_reaches_its_total(tmp_path, nodes):
    # a third of the chunks are zero, a third random, a third text that zstd shrinks
    # ~100x: the compressible chunks cross the wire much smaller than they are
    img = mixed_image(tmp_path / "img", 48 * CS, seed=21, chunk=CS)
    a = nodes(Cli(tmp_path / "a"))
    mid = a.cli.json("backup", img, "--chunk-size", str(CS))["manifest"]
    b = nodes(Cli(tmp_path / "b"), "--bootstrap", a.addr)
    c = nodes(Cli(tmp_path / "c"), "--bootstrap", a.addr)
    _providers(b, mid)

    # the node's event stream, as the CLI gets it (progress=True: a terminal asks)
    events: list[dict] = []
    final = call(b.cli.data_dir, "fetch", {"ref": mid}, progress=True,
                 on_event=events.append, timeout=120)
    doc = json.loads(final["doc"])
    assert not doc["already_held"] and doc["chunks_fetched"] > 0
    bars = _bars(events)
    assert [label for label, _, _ in bars] == ["fetch"], bars
    _, total, advanced = bars[0]
    assert total == _distinct_bytes(img), bars       # plaintext of the chunks to fetch
    assert advanced == total, f"the bar stopped at {100 * advanced / total:.0f}%"
    # the wire carried less than the bar counts (the compressible chunks)
    assert doc["bytes_fetched"] < total

    # a terminal: the bar ends at 100% and shows bytes and speed
    _providers(c, mid)
    rc, screen = _run_on_pty(["fetch", mid], cli_env(c.cli.data_dir))
    assert rc == 0, screen
    assert "fetch" in screen and "100%" in screen, screen
    mb = f"{total / 1e6:.1f}"
    assert f"{mb}/{mb} MB" in screen, screen                     # done/total (MB = 10^6)
    assert re.search(r"\d+(\.\d+)? [kMGT]?B/s", screen), screen  # speed


def test_network_restore_summary_covers_the_fetch(tmp_path, nodes):
    img = mixed_image(tmp_path / "img", 24 * CS, seed=22, chunk=CS)
    # A serves at most 8 MiB/s (a test-only cap): the fetch of the 8 random chunks
    # takes about a second, far longer than completing the image written meanwhile
    a = nodes(Cli(tmp_path / "a"), env={"HYPERSDK_TEST_SERVE_RATE": "8M"})
    mid = a.cli.json("backup", img, "--chunk-size", str(CS))["manifest"]
    d = nodes(Cli(tmp_path / "d"), "--bootstrap", a.addr)
    _providers(d, mid)
    out = tmp_path / "out"
    # the reply the CLI prints from: its document (--json) and its text, of one restore
    final = call(d.cli.data_dir, "restore", {"ref": mid, "out": str(out), "force": False},
                 timeout=120)
    doc, text = json.loads(final["doc"]), final["text"].decode()
    assert same_bytes(img, out)
    fetched = doc["fetched"]
    assert not fetched["already_held"] and fetched["chunks_fetched"] > 0
    assert doc["bytes"] == 24 * CS
    assert doc["seconds"] >= fetched["seconds"] > 0, doc

    # the text says the same: the seconds, and a rate that is bytes / seconds
    m = re.search(r": (\d+\.\d) ([kMGT]?B) in (\d+\.\d\d) s \((\d+\.\d) ([kMGT]?B)/s\)", text)
    assert m, text
    size, seconds = float(m[1]) * _UNIT[m[2]], float(m[3])
    rate = float(m[4]) * _UNIT[m[5]]
    assert abs(size - doc["bytes"]) <= 0.05e6, text
    assert abs(seconds - doc["seconds"]) <= 0.006, (text, doc["seconds"])
    assert abs(rate - doc["bytes"] / doc["seconds"]) <= 0.01 * rate + 0.05 * _UNIT[m[5]], text
