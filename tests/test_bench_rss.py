"""bench/bench_rss.py's memory sampling: a process tree's RSS, and no process of it left behind."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import psutil

from bench.bench_rss import MIB, TreeSampler, peak, stop_tree, tree_memory

# A parent that starts a child which touches 200 MiB, reports "ready", and lives until killed; the
# parent ignores its child on SIGTERM, like a gateway that exits without releasing its engine.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import sys, time
block = bytearray(200 * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
time.sleep(600)
'''], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print("ready", flush=True)
time.sleep(600)
"""


def _start_tree() -> subprocess.Popen:
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    return parent


def _stop(parent: subprocess.Popen) -> None:
    parent.terminate()
    parent.wait(timeout=10)


def test_sampler_sums_the_whole_tree_and_stop_tree_kills_the_orphan():
    parent = _start_tree()
    gateway = SimpleNamespace(process=parent, stop=lambda: _stop(parent))
    sampler = TreeSampler(parent.pid, interval=0.05)
    try:
        time.sleep(0.3)
    finally:
        sampler.stop()
        killed = stop_tree(gateway, sampler.seen, grace_s=0.5)
    top = peak(sampler.samples)
    assert len(sampler.samples) >= 3
    assert top.total / MIB > 200  # the grandchild's touched block, which the parent alone does not hold
    assert top.rss["gateway"] / MIB < 100  # the root is labelled "gateway"; its own RSS is a bare interpreter
    assert len(sampler.seen) == 2
    assert len(killed) == 1 and "bytearray" in killed[0]  # the orphan, by pid
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sampler.seen.values())


def test_tree_memory_of_a_gone_process_is_empty():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    handle = psutil.Process(proc.pid)
    proc.wait()
    assert tree_memory(handle).total == 0
