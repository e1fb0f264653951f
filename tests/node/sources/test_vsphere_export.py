"""export.DiskReader + source.VsphereDiskSource + the chunker over real HTTPS on
127.0.0.1 (a stdlib server with Range support, TLS verified against a test CA):
a raw export read by Range, a streamOptimized VMDK (made by qemu-img) read in one
pass, a sparse VMDK that is not streamOptimized refused. vCenter serves
streamOptimized exports, which vcsim cannot: this is where that path runs."""
from __future__ import annotations

import http.server
import random
import re
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from vcsim_helpers import tls_files

from hypersdk.node.errors import UserError
from hypersdk.node.service.backup import backup_source
from hypersdk.node.service.restore import restore
from hypersdk.node.sources.vsphere.export import DiskReader
from hypersdk.node.sources.vsphere.session import Http
from hypersdk.node.sources.vsphere.source import VsphereDiskSource
from hypersdk.node.store.store import ChunkStore

MiB, CS = 1 << 20, 256 << 10


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path = None
    gets: list = None

    def log_message(self, *a):
        pass

    def do_GET(self):
        data = (self.root / self.path.lstrip("/")).read_bytes()
        self.gets.append(self.headers.get("Range"))
        m = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        if m:
            s, e = int(m.group(1)), int(m.group(2)) + 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {s}-{e - 1}/{len(data)}")
            data = data[s:e]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass                                   # the reader closed early (the probe)


@pytest.fixture
def server(tmp_path):
    ca, cert, key = tls_files(tmp_path / "tls")
    root = tmp_path / "www"
    root.mkdir()
    handler = type("H", (_Handler,), {"root": root, "gets": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    srv.socket = sctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    http_ = Http("127.0.0.1", srv.server_address[1], ssl.create_default_context(cafile=ca), "c=1")
    yield root, http_, handler.gets
    srv.shutdown()
    srv.server_close()


def sparse_image(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    img = bytearray(size)
    for _ in range(6):
        off = rng.randrange(size)
        img[off:off + rng.randrange(1, 300000)] = rng.randbytes(300000)[:max(0, size - off)]
    return bytes(img[:size])


def nonzero_areas(img: bytes, bs: int = 64 << 10) -> list[tuple[int, int]]:
    return [(o, min(bs, len(img) - o)) for o in range(0, len(img), bs) if any(img[o:o + bs])]


def backup_and_restore(tmp_path, reader, img, areas, name):
    src = VsphereDiskSource(reader, len(img), CS, areas, path=f"test/{name}", metadata={})
    with ChunkStore(tmp_path / "data") as store:
        r = backup_source(store, src, name=name, chunk_size=CS)
        restore(store, f"{name}@{r.version}", str(tmp_path / f"{name}.out"))
    return (tmp_path / f"{name}.out").read_bytes()


def test_raw_export_reads_only_the_areas_by_range(tmp_path, server):
    root, http_, gets = server
    img = sparse_image(5 * MiB + 4096, 1)
    (root / "disk.raw").write_bytes(img)
    areas = nonzero_areas(img)
    reader = DiskReader(http_, None, f"https://127.0.0.1:{http_.port}/disk.raw", len(img), "d")
    assert backup_and_restore(tmp_path, reader, img, areas, "raw") == img
    assert reader.format == "raw"
    assert reader.downloaded == sum(n for _, n in areas) + 512          # + the probe
    merged = 1 + sum(1 for (a, n), (b, _) in zip(areas, areas[1:]) if a + n != b)
    assert reader.requests == merged + 1 == len(gets)                   # one GET per run


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils) not installed")
@pytest.mark.parametrize("size", [5 * MiB + 4096, 64 << 10, 3 * MiB])
def test_stream_optimized_export_is_read_in_one_pass(tmp_path, server, size):
    root, http_, gets = server
    img = sparse_image(size, size)
    raw = tmp_path / "in.raw"
    raw.write_bytes(img)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", str(raw), str(root / "disk.vmdk")], check=True)
    reader = DiskReader(http_, None, f"https://127.0.0.1:{http_.port}/disk.vmdk", len(img), "d")
    # vCenter's areas are the virtual disk's: here every non-zero block
    assert backup_and_restore(tmp_path, reader, img, nonzero_areas(img), "so") == img
    assert reader.format == "streamOptimized" and gets[0] is None      # no Range: one pass
    assert reader.downloaded <= (root / "disk.vmdk").stat().st_size


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils) not installed")
def test_a_sparse_vmdk_that_is_not_stream_optimized_is_refused(tmp_path, server):
    root, http_, _ = server
    raw = tmp_path / "in.raw"
    raw.write_bytes(sparse_image(MiB, 3))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=monolithicSparse", str(raw), str(root / "disk.vmdk")], check=True)
    reader = DiskReader(http_, None, f"https://127.0.0.1:{http_.port}/disk.vmdk", MiB, "d")
    with pytest.raises(UserError, match="not streamOptimized"):
        reader.read_into(bytearray(CS), 0, CS)


def test_prefetch_serves_the_plan_in_order_within_its_bound(tmp_path, server):
    """export.Prefetch reads the planned spans ahead (touching spans in one Range
    request), holds at most `limit` bytes, hands each span over once, answers None
    for an ask off the plan (the caller reads directly), and starts only after the
    event it waits for."""
    import threading

    from hypersdk.node.sources.vsphere.export import Prefetch
    root, http_, gets = server
    img = sparse_image(4 * MiB, 5)
    (root / "disk.raw").write_bytes(img)
    url = f"https://127.0.0.1:{http_.port}/disk.raw"
    spans = [(0, CS), (CS, 2 * CS), (3 * CS, 3 * CS + 1000), (6 * CS, 8 * CS)]
    gate = threading.Event()
    p = Prefetch(DiskReader(http_, None, url, len(img), "d"), spans, limit=CS + 1000,
                 after=gate, timeout=5)
    assert not p.done.wait(0.2) and p.peak == 0          # waits for its turn
    gate.set()
    assert p.take(0, CS) == img[:CS] and p.take(CS, CS) == img[CS:2 * CS]
    assert p.take(3 * CS, 1000) == img[3 * CS:3 * CS + 1000]
    assert p.take(6 * CS + 5, 10) is None                # off the plan: read it directly
    assert p.take(6 * CS, 2 * CS) == img[6 * CS:8 * CS]
    assert p.done.wait(5) and p.failed is None and p.served == 4
    assert p.peak <= 2 * CS                              # one span over the limit at most
    assert p.reader.requests == 1 + 3                    # the probe, then one GET per run
    p.close()


def test_backup_with_prefetch_reads_each_byte_once(tmp_path, server):
    from hypersdk.node.sources.vsphere.export import Prefetch
    root, http_, gets = server
    img = sparse_image(5 * MiB + 4096, 7)
    (root / "disk.raw").write_bytes(img)
    url = f"https://127.0.0.1:{http_.port}/disk.raw"
    areas = nonzero_areas(img)
    direct = DiskReader(http_, None, url, len(img), "d")
    src = VsphereDiskSource(direct, len(img), CS, areas, path="test/p", metadata={})
    ahead = DiskReader(http_, None, url, len(img), "d")
    src.prefetch = Prefetch(ahead, src.planned_spans(), limit=4 * CS)
    with ChunkStore(tmp_path / "data") as store:
        backup_source(store, src, name="p", chunk_size=CS)
        src.close()
        restore(store, "p@1", str(tmp_path / "p.out"))
    assert (tmp_path / "p.out").read_bytes() == img
    assert direct.downloaded == 0 and src.prefetch.missed == 0
    assert ahead.downloaded == sum(n for _, n in areas) + 512
