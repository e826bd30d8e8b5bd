"""The share of the machine's CPU time that other processes used while a benchmark ran: every timing of
``dset.bench`` reports it, since contention on a small machine distorts latencies and throughputs."""

from __future__ import annotations

import os
import time

__all__ = ["OtherCpuShare"]


class OtherCpuShare:
    """Share of the machine's CPU time used by OTHER processes between ``start()`` and ``stop()``
    (Linux ``/proc``; None elsewhere). 0.0 = the cores were ours; 0.5 on 2 cores = one core busy
    elsewhere. Reported with every latency because contention distorts it."""

    def _read(self):
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle, iowait
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime of this process (all threads)
        return busy, own, time.monotonic()

    def start(self):
        try:
            self._t0 = self._read()
        except (OSError, ValueError, IndexError):
            self._t0 = None
        return self

    def stop(self):
        if self._t0 is None:
            return None
        try:
            busy1, own1, t1 = self._read()
        except (OSError, ValueError, IndexError):
            return None
        busy0, own0, t0 = self._t0
        capacity = (t1 - t0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        if capacity <= 0:
            return None
        return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / capacity, 3)
