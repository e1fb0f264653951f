"""Fallback image generator for the demo when ../shared/bench/make_image.py is
absent: a day-1 image (zeros, text, random data) and a day-2 copy with a few
changed regions. Usage: synthetic_image.py DAY1 DAY2 SIZE"""
import random
import shutil
import sys

from hypersdk.node.config import parse_size

day1, day2, size = sys.argv[1], sys.argv[2], parse_size(sys.argv[3])
rng = random.Random(1)
MiB = 1 << 20
with open(day1, "wb") as f:
    for i in range(size // MiB):
        kind = rng.random()
        if kind < 0.4:
            f.write(bytes(MiB))
        elif kind < 0.55:
            f.write(rng.randbytes(MiB))
        else:
            words = [rng.choice([b"kernel", b"sshd", b"GET /api", b"200", b"ok"]) for _ in range(64)]
            f.write((b" ".join(words) * (MiB // 200 + 1))[:MiB])
shutil.copyfile(day1, day2)
with open(day2, "r+b") as f:
    for _ in range(max(1, size // MiB // 20)):
        f.seek(rng.randrange(size // 4096) * 4096)
        f.write(rng.randbytes(4096))
