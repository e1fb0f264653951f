"""Reading a snapshot's disks through an ExportSnapshot (NFC) lease.

The lease gives one HTTPS URL per disk. What it serves depends on the server:
vCenter serves a streamOptimized VMDK (compressed grains, one pass, no Range),
vcsim the raw disk bytes (Range works). `DiskReader` looks at the first sector
and picks:
- raw: positional Range GETs; a read continues the open response when it starts
  where the last one ended, else one GET from there to the end of the run of
  chunks the caller will read next (`run_end`), so contiguous chunks cost one
  request and skipped ones are never downloaded;
- streamOptimized: one pass through the grains (node/sources/vmdk.py); bytes
  before a read are skipped as they stream by, absent grains read as zeros. A
  read behind the stream's position starts the stream again.
`downloaded` counts the bytes that came over HTTP (the benchmark's and `--json`'s
"bytes read").

The lease must hear from us (HttpNfcLeaseProgress) or vCenter drops it after
its timeout: every read keeps it alive at most every KEEPALIVE seconds. It is
completed after a good backup and aborted otherwise.
"""
from __future__ import annotations

import http.client
import time

from hypersdk.node.errors import UserError

KEEPALIVE = 30.0
READY_TIMEOUT = 300.0
PROBE = 512


class Lease:
    """An NFC export lease (snap.ExportSnapshot() or a powered-off vm.ExportVm()),
    ready to read."""

    def __init__(self, session, lease, what: str):
        from pyVmomi import vim
        self.session, self.what, self.lease = session, what, lease
        deadline = time.monotonic() + READY_TIMEOUT
        delay = 0.02
        while self.lease.state == vim.HttpNfcLease.State.initializing:
            if time.monotonic() > deadline:
                self.abort()
                raise UserError(f"{what}: export lease not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(delay)                   # polling a remote lease: backoff to 1 s
            delay = min(1.0, delay * 2)
        if self.lease.state != vim.HttpNfcLease.State.ready:
            err = self.lease.error
            raise UserError(f"{what}: export refused by vSphere: {getattr(err, 'msg', err)}")
        self.urls = [(u.key, u.url) for u in self.lease.info.deviceUrl if u.disk]
        self._alive = time.monotonic()

    def url_for(self, disk, position: int) -> str:
        """The export URL of `disk` (vm.Disk), the position-th disk of the VM: the
        device URL whose key names the disk's label, else the position-th one."""
        for key, url in self.urls:
            if key.endswith("/" + disk.label):
                return self.session.nfc_url(url)
        if position < len(self.urls):
            return self.session.nfc_url(self.urls[position][1])
        raise UserError(f"{self.what}: the export lease has no URL for disk {disk.label}")

    def keepalive(self) -> None:
        if time.monotonic() - self._alive < KEEPALIVE:
            return
        self._alive = time.monotonic()
        try:
            self.lease.HttpNfcLeaseProgress(50)
        except Exception:                        # a lost lease shows on the next read
            pass

    def complete(self) -> None:
        try:
            self.lease.HttpNfcLeaseComplete()
        except Exception:                        # nothing is lost: the data is read
            pass

    def abort(self) -> None:
        try:
            self.lease.HttpNfcLeaseAbort()
        except Exception:
            pass


class _Prefixed:
    """A response whose first bytes were read already: read(n) gives them first."""

    def __init__(self, prefix: bytes, resp, count):
        self.prefix, self.resp, self.count = prefix, resp, count

    def read(self, n: int) -> bytes:
        if self.prefix:
            out, self.prefix = self.prefix[:n], self.prefix[n:]
            return out
        data = self.resp.read(n)
        self.count(len(data))
        return data


class DiskReader:
    """One disk of an export (module doc). read_into is called in image order,
    mostly; anything else still works (a new request)."""

    def __init__(self, http, lease: Lease | None, url: str, capacity: int, label: str):
        """http: session.Http (a logged-in session's .http)."""
        self.http, self.lease, self.url = http, lease, url
        self.capacity, self.label = capacity, label
        self.downloaded = 0
        self.requests = 0
        self._conn = self._resp = None
        self._at = -1                            # raw: where the open response stands ...
        self._end = -1                           # ... and where it ends
        self.format = None                       # "raw" | "streamOptimized", after probe()
        self._grains = None
        self._grain = None                       # (offset, data) not yet wholly consumed
        self._stream_at = 0

    def _count(self, n: int) -> None:
        self.downloaded += n

    def _open(self, start=None, end=None):
        keep = None
        if self._conn is not None and self._resp is not None and self._resp.length == 0:
            keep = self._conn                     # the last body was read whole: reuse
            self._conn = self._resp = None
        self.close()
        self.requests += 1
        self._conn, self._resp = self.http.get(self.url, start, end, conn=keep)

    def probe(self) -> str:
        """Look at the first sector and choose how to read."""
        from hypersdk.node.sources import vmdk
        self._open()
        head = self._read_exact_raw(min(PROBE, self.capacity) if self.capacity else PROBE,
                                    allow_short=True)
        if head[:4] == b"KDMV" and not vmdk.is_stream_optimized(head):
            raise UserError(f"disk {self.label}: the export is a sparse VMDK that is not "
                            "streamOptimized: not supported")
        if vmdk.is_stream_optimized(head):
            self.format = "streamOptimized"
            self._start_stream(head)
        else:
            self.format = "raw"
            self.close()
        return self.format

    def _start_stream(self, head: bytes) -> None:
        from hypersdk.node.sources import vmdk
        try:
            r = vmdk.StreamOptimizedReader(_Prefixed(head, self._resp, self._count))
        except vmdk.VmdkError as exc:
            raise UserError(f"disk {self.label}: bad streamOptimized export: {exc}") from None
        if r.capacity != self.capacity:
            raise UserError(f"disk {self.label}: the export holds {r.capacity} bytes, the "
                            f"disk {self.capacity}")
        self._grains, self._grain, self._stream_at = r.grains(), None, 0

    def _read_exact_raw(self, n: int, allow_short: bool = False) -> bytes:
        parts, got = [], 0
        while got < n:
            try:
                piece = self._resp.read(n - got)
            except (OSError, http.client.HTTPException) as exc:
                raise self._lost(exc) from None
            if not piece:
                if allow_short:
                    break
                raise self._lost(None)
            parts.append(piece)
            got += len(piece)
        self.downloaded += got
        return b"".join(parts)

    def _lost(self, exc) -> UserError:
        why = f": {getattr(exc, 'strerror', None) or exc}" if exc else ""
        return UserError(f"disk {self.label}: the connection to vSphere was lost while "
                         f"reading{why}")

    def keepalive(self) -> None:
        """Tell the lease we are still reading (at most every KEEPALIVE seconds)."""
        if self.lease is not None:
            self.lease.keepalive()

    def read_into(self, buf, pos: int, n: int, run_end: int | None = None) -> None:
        self.keepalive()
        if self.format is None:
            self.probe()
        if self.format == "raw":
            self._read_raw(buf, pos, n, run_end)
        else:
            self._read_stream(buf, pos, n)

    def _read_raw(self, buf, pos, n, run_end) -> None:
        if self._resp is None or self._at != pos or pos + n > self._end:
            end = max(pos + n, min(run_end or pos + n, self.capacity))
            self._open(pos, end)
            self._at, self._end = pos, end
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                try:
                    k = self._resp.readinto(view[got:n])
                except (OSError, http.client.HTTPException) as exc:
                    raise self._lost(exc) from None
                if not k:
                    raise self._lost(None)
                got += k
        finally:
            view.release()
        self.downloaded += n
        self._at = pos + n

    def _read_stream(self, buf, pos, n) -> None:
        from hypersdk.node.sources import vmdk
        if pos < self._stream_at:                # behind the stream: start it again
            self._open()
            self._start_stream(self._read_exact_raw(PROBE))
        view = memoryview(buf)
        view[:n] = bytes(n)
        end = pos + n
        try:
            while True:
                if self._grain is None:
                    try:
                        self._grain = next(self._grains, None)
                    except vmdk.VmdkError as exc:
                        raise UserError(f"disk {self.label}: bad streamOptimized export: "
                                        f"{exc}") from None
                    except (OSError, http.client.HTTPException) as exc:
                        raise self._lost(exc) from None
                    if self._grain is None:
                        break                    # the rest of the disk is zeros
                off, data = self._grain
                if off >= end:
                    break                        # belongs to a later read
                s, e = max(off, pos), min(off + len(data), end)
                if e > s:
                    view[s - pos:e - pos] = data[s - off:e - off]
                if off + len(data) <= end:
                    self._grain = None           # consumed
                else:
                    break
        finally:
            view.release()
        self._stream_at = end

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None
        self._at = -1


class Prefetch:
    """Reads an export's planned spans ahead of the chunker, in a thread, into a
    buffer of at most `limit` bytes: the network works while the chunker hashes and
    stores, and the next disks' reads overlap the current one's ingest.

    spans: [(start, end)] in the order the source will ask for them (the changed or
    allocated areas, cut at chunk boundaries); touching spans are read with one
    Range request. after: an Event to wait for before starting (the bound on disks
    read at once: disk i starts when disk i - N has been read); done: set when
    finished or failed. `take(pos, n)` returns the planned bytes at pos, or None when
    the plan and the ask differ, the prefetch failed, or nothing came within the
    timeout: the caller then reads directly (and meets any error itself).
    """

    def __init__(self, reader: DiskReader, spans, *, limit: int, after=None, done=None,
                 timeout: float = 60.0):
        import collections
        import threading
        self.reader, self.limit, self.timeout = reader, limit, timeout
        self.spans = list(spans)
        self.runs = [0] * len(self.spans)        # the end of the touching run of span i
        end = None
        for i in range(len(self.spans) - 1, -1, -1):
            s, e = self.spans[i]
            end = end if end is not None and i + 1 < len(self.spans) \
                and self.spans[i + 1][0] == e else e
            self.runs[i] = end
        self.after, self.done = after, done or threading.Event()
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self._stop = False
        self.failed: BaseException | None = None
        self.served = self.missed = 0
        self.peak = 0                            # most bytes held at once
        self._thread = threading.Thread(target=self._run, name=f"prefetch {reader.label}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while self.after is not None and not self.after.wait(0.1):
                if self._stop:                   # closed before its turn came
                    return
            for (s, e), run in zip(self.spans, self.runs):
                with self._cv:
                    while self._items and self._bytes + (e - s) > self.limit and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                buf = bytearray(e - s)
                self.reader.read_into(buf, s, e - s, run)
                with self._cv:
                    self._items.append((s, buf))
                    self._bytes += len(buf)
                    self.peak = max(self.peak, self._bytes)
                    self._cv.notify_all()
        except BaseException as exc:            # the consumer reads directly instead
            self.failed = exc
        finally:
            self.reader.close()
            self.done.set()
            with self._cv:
                self._cv.notify_all()

    def take(self, pos: int, n: int):
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while True:
                while self._items and self._items[0][0] + len(self._items[0][1]) <= pos:
                    _, b = self._items.popleft()  # planned but not asked: dropped
                    self._bytes -= len(b)
                    self._cv.notify_all()
                if self._items:
                    s, b = self._items[0]
                    if s != pos or len(b) != n:
                        self.missed += 1
                        return None
                    self._items.popleft()
                    self._bytes -= n
                    self._cv.notify_all()
                    self.served += 1
                    return b
                left = deadline - time.monotonic()
                if self.done.is_set() or left <= 0:
                    self.missed += 1
                    return None
                self._cv.wait(left)

    def close(self) -> None:
        """Stop (a read in flight is cut by closing its connection: an error or Ctrl-C
        must not wait for the network) and wait briefly for the thread."""
        with self._cv:
            self._stop = True
            self._items.clear()
            self._bytes = 0
            self._cv.notify_all()
        if self._thread.is_alive():
            self.reader.close()
        self._thread.join(timeout=5.0)
