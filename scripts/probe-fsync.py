#!/usr/bin/env python3
"""The disk's flush latency, as a commit's WAL flush sees it: N writes of
8 KiB, each followed by fdatasync, 0.5 ms apart, in the directory given
(default: the local stack's, .stack). Prints the quantiles in ms.
Usage: scripts/probe-fsync.py [N (5000)] [DIR]"""
import os
import sys
import time

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
directory = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", ".stack")
os.makedirs(directory, exist_ok=True)
path = os.path.join(directory, "probe-fsync.tmp")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
buf = b"x" * 8192
lat = []
try:
    for i in range(n):
        os.pwrite(fd, buf, (i % 128) * 8192)
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append((time.perf_counter() - t) * 1e3)
        time.sleep(0.0005)
finally:
    os.close(fd)
    os.unlink(path)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))]
print(f"fdatasync of 8 KiB, {n} times: p50 {q(0.5):.3f} p90 {q(0.9):.3f} p99 {q(0.99):.3f} "
      f"p99.9 {q(0.999):.3f} max {lat[-1]:.3f} ms; over 5 ms: {sum(1 for x in lat if x > 5)}")
