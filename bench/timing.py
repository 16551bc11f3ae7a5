"""
How bench.py measures: the best-of-n wall time of a call with a device sync around it (noise only
ever adds time), the wall time of a call too long to repeat, the peak resident memory a call adds in
this process, and the peak resident memory of a child process (Linux: /proc/self/status). Generic:
nothing here knows the product.
"""

import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats=3, warmup=1, device="cpu"):
    """Best wall time of fn() over `repeats` runs after `warmup` untimed ones (noise only ever adds
    time)."""
    for _ in range(warmup):
        fn()
    sync(device)
    return min(timed(lambda: (fn(), sync(device)))[1] for _ in range(repeats))


def timed(call):
    """-> (call(), its wall time in seconds): for calls too long to repeat."""
    t = time.perf_counter()
    return call(), time.perf_counter() - t


def peak_during(call):
    """-> (call(), seconds, MiB of resident memory it added at its peak). VmHWM is reset to the
    current RSS first (Linux >= 4.0; ru_maxrss cannot be reset), so the figure is page-exact for
    this call alone."""

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":")) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    out, sec = timed(call)
    return out, sec, rss("VmHWM") - base


def child_peak(code, *argv):
    """`python -c code argv` in a fresh process -> (its peak RSS in MiB, s). The child reads its own
    VmHWM at the end: ru_maxrss of a child would include the parent's RSS at the fork (Linux carries
    it over the exec)."""
    code += (
        "\nprint(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')),"
        " file=sys.stderr)"
    )
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-c", code, *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        )
        err.seek(0)
        log = err.read().decode(errors="replace")
    if r.returncode or "VmHWM" not in log:
        raise RuntimeError(
            f"python -c {code.splitlines()[0]!r} failed (exit {r.returncode}):\n{log[-3000:]}"
        )
    return int(log.rsplit("VmHWM:", 1)[1].split()[0]) / 1024, time.perf_counter() - t
