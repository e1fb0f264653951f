"""Cost of encryption at rest (protocol/sealing.py) next to what a backup already pays.

    .venv/bin/python bench/bench_sealing.py [--chunks 256] [--repeat 5] [--json]

Data: --chunks 1 MiB chunks, each half random bytes, half text-like bytes (words
drawn at random from a small vocabulary, ~3.7x compressible by zstd -3; the whole
chunk ~1.6x), so a chunk is neither all noise nor all text. One thread. --repeat
rounds each run every stage once over all chunks (interleaved, so load from other
processes hits every stage alike); a figure is the stage's best round. Results are
dropped as produced, as a backup streams them. MB = 10^6 bytes.

Stages (MB/s of the stage's own input, and of the plaintext it stands for):
  plain id       protocol.chunks.chunk_id: BLAKE3 of the plaintext (today's id)
  keyed id       sealing.keyed_id: BLAKE3 keyed with the id subkey
  zstd -3        zstandard level 3, one compressor reused (the store's codec)
  seal           sealing.seal of the compressed payload (keyed IV hash + AES-256-GCM)
  open           sealing.open_record of those records
Pipelines (MB/s of plaintext), what a backup does per chunk:
  plain id + zstd                 id, compress (zstd if it shrinks the chunk, else raw)
  keyed id + zstd + seal          the same with the keyed id, then seal
and the ratio of the two. Measures, does not assert.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zstandard  # noqa: E402

from hypersdk.protocol import sealing  # noqa: E402
from hypersdk.protocol.chunks import DEFAULT_CHUNK, chunk_id  # noqa: E402

WORDS = (b"the of and to in is was for on that with as by at from this backup disk image "
         b"block chunk volume server page table index log error warning info user data file "
         b"0 1 2 10 42 100 255 1024 4096 2026-12-01 12:00:00 /var/lib /usr/bin = : ; , .").split()


def make_chunks(n: int, size: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    half = size // 2
    pool = b" ".join(rng.choices(WORDS, k=(4 * size) // 5))    # ~ 4 x size of text-like bytes
    out = []
    for _ in range(n):
        at = rng.randrange(0, len(pool) - half)
        out.append(rng.randbytes(size - half) + pool[at:at + half])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    chunks = make_chunks(a.chunks, a.chunk_size)
    plain = sum(map(len, chunks))
    key = sealing.DataKey.generate(os.urandom(32))
    zc = zstandard.ZstdCompressor(level=3)

    kids = [sealing.keyed_id(key, c) for c in chunks]
    zs = [zc.compress(c) for c in chunks]
    zbytes = sum(map(len, zs))
    recs = [sealing.seal(key, sealing.KIND_CHUNK, i, 1, len(c), z) for i, c, z in zip(kids, chunks, zs)]
    for i, r, z in zip(kids, recs, zs):                     # check before timing anything
        assert sealing.open_record(key, sealing.KIND_CHUNK, i, r).payload == z

    def pipe_plain():
        for c in chunks:
            chunk_id(c)
            z = zc.compress(c)
            if len(z) >= len(c):
                z = c

    def pipe_sealed():
        for c in chunks:
            oid = sealing.keyed_id(key, c)
            z, codec = zc.compress(c), 1
            if len(z) >= len(c):
                z, codec = c, 0
            sealing.seal(key, sealing.KIND_CHUNK, oid, codec, len(c), z)

    def each(fn, *cols):
        def run():
            for args in zip(*cols):
                fn(*args)                       # results dropped, as a backup streams them
        return run

    kind = sealing.KIND_CHUNK
    stages = [  # name, function, bytes of the stage's input
        ("plain id (BLAKE3)", each(chunk_id, chunks), plain),
        ("keyed id (BLAKE3 keyed)", each(lambda c: sealing.keyed_id(key, c), chunks), plain),
        ("zstd -3 compress", each(zc.compress, chunks), plain),
        ("seal (of the zstd payload)",
         each(lambda i, c, z: sealing.seal(key, kind, i, 1, len(c), z), kids, chunks, zs), zbytes),
        ("open", each(lambda i, r: sealing.open_record(key, kind, i, r), kids, recs),
         zbytes + len(recs) * sealing.RECORD_OVERHEAD),
        ("pipeline: plain id + zstd", pipe_plain, plain),
        ("pipeline: keyed id + zstd + seal", pipe_sealed, plain),
    ]
    times = [float("inf")] * len(stages)
    for _ in range(a.repeat):                   # rounds of every stage: drift hits all alike
        for k, (_, fn, _) in enumerate(stages):
            t = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - t)
    rows = [{"stage": name, "input_mb": round(nbytes / 1e6, 1), "seconds": round(dt, 4),
             "mb_s_input": round(nbytes / dt / 1e6), "mb_s_plaintext": round(plain / dt / 1e6)}
            for (name, _, nbytes), dt in zip(stages, times)]
    ratio = rows[-1]["seconds"] / rows[-2]["seconds"]
    doc = {"chunks": a.chunks, "chunk_size": a.chunk_size, "plaintext_mb": round(plain / 1e6, 1),
           "zstd_ratio": round(plain / zbytes, 2), "record_overhead": sealing.RECORD_OVERHEAD,
           "stages": rows, "sealed_pipeline_time_ratio": round(ratio, 3),
           "sealed_pipeline_throughput_ratio": round(1 / ratio, 3)}
    if a.json:
        print(json.dumps(doc, indent=1))
        return
    print(f"{a.chunks} chunks of {a.chunk_size} B ({plain / 1e6:.0f} MB; half random, half text), "
          f"zstd -3 ratio {plain / zbytes:.2f}, best of {a.repeat}, one thread")
    print(f"{'stage':34} {'input MB':>9} {'s':>8} {'MB/s in':>9} {'MB/s plain':>11}")
    for r in rows:
        print(f"{r['stage']:34} {r['input_mb']:9.1f} {r['seconds']:8.3f} {r['mb_s_input']:9} "
              f"{r['mb_s_plaintext']:11}")
    print(f"keyed id + zstd + seal vs plain id + zstd: {1 / ratio:.1%} of the throughput "
          f"({ratio:.3f}x the time; seal adds {sealing.RECORD_OVERHEAD} B per record)")


if __name__ == "__main__":
    main()
