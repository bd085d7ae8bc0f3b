#!/usr/bin/env python3
"""What the machine does each second while a benchmark runs beside it: the
disk's flush latency (one 8 KiB write and fdatasync every 50 ms, in the
directory given; default the local stack's, .stack) and the CPU's split
from /proc/stat (user, system, idle, I/O wait, and steal: time the
hypervisor gave to another guest). One line a second until stopped.
Usage: scripts/probe-machine.py [DIR] &  (then run the benchmark; kill it)"""
import os
import signal
import sys
import time

directory = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", ".stack")
os.makedirs(directory, exist_ok=True)
path = os.path.join(directory, "probe-machine.tmp")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
buf = b"x" * 8192


def cpu():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


# Stopped by kill (SIGTERM) as by Ctrl-C: the probe's file is removed.
signal.signal(signal.SIGTERM, signal.default_int_handler)
prev, lat, start, i = cpu(), [], time.time(), 0
try:
    while True:
        os.pwrite(fd, buf, (i % 128) * 8192)
        i += 1
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append((time.perf_counter() - t) * 1e3)
        time.sleep(0.05)
        if time.time() - start >= 1:
            now = cpu()
            d = [a - b for a, b in zip(now, prev)]
            total = sum(d) or 1
            lat.sort()
            # /proc/stat: user nice system idle iowait irq softirq steal
            share = [100 * d[j] // total for j in (0, 2, 3, 4, 7)]
            print(time.strftime("%H:%M:%S"), "fsync p50 %.2f max %.2f ms" % (lat[len(lat) // 2], lat[-1]),
                  "user %d sys %d idle %d iowait %d steal %d %%" % tuple(share), flush=True)
            prev, lat, start = now, [], time.time()
except KeyboardInterrupt:
    pass
finally:
    os.close(fd)
    os.unlink(path)
