"""One run per output: an exclusive lock file naming its holder (host, pid, Slurm job), taken with
O_EXCL, released on exit. Importable (stdlib + data.DataError) and a tiny CLI for run_cv.sh.

    with locks.hold("outputs/run/fold0/.lock", "train.py"):   # DataError naming the holder if taken
        ...
    python locks.py acquire outputs/run/.lock --pid $$ --what run_cv.sh   # the shell holds it
    python locks.py release outputs/run/.lock --pid $$

A lock whose holder is gone is taken over with a note: a dead pid on this host, or an earlier run of
the same Slurm job (a requeued job keeps SLURM_JOB_ID and counts SLURM_RESTART_COUNT up, whichever
node it lands on). A lock held from
another host cannot be checked from here: the error names it and says to delete the file when that
job is gone.
"""

import argparse
import contextlib
import json
import os
import socket
import sys
import time

import data

LOCK_NAME = ".lock"  # in an output folder; a file output (a feature cache) uses <file>.lock


def slurm_job():
    """This process's Slurm job id (array jobs: <array job>_<task>), or None outside Slurm."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def read_holder(path):
    """The lock's record {host, pid, job, what, since}, or None when the file is gone; an unreadable
    one (a writer killed between create and write) reads as {}."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(text)
        return rec if isinstance(rec, dict) else {}
    except ValueError:
        return {}


def describe(rec):
    if not rec:
        return "an unreadable lock record"
    job = f", Slurm job {rec['job']}" if rec.get("job") else ""
    return f"{rec.get('what', '?')} (host {rec.get('host')}, pid {rec.get('pid')}{job})"


def _restart():
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _stale(rec, host, job):
    """True when the holder is certainly gone: a dead pid here, or an earlier run (restart count)
    of this Slurm job. An empty record (acquire waits a while first): its writer died."""
    if rec == {}:
        return True
    if job is not None and rec.get("job") == job and rec.get("restart", 0) < _restart():
        return True
    return rec.get("host") == host and isinstance(rec.get("pid"), int) and not _alive(rec["pid"])


def acquire(path, what, pid=None):
    """Create the lock file with O_EXCL (one creator wins, also on NFS v3+), taking over a stale
    one with a note on stderr. -> the record written; DataError naming the holder if it is live."""
    pid = os.getpid() if pid is None else int(pid)
    host, job = socket.gethostname(), slurm_job()
    rec = dict(host=host, pid=pid, job=job, restart=_restart(), what=what)
    rec["since"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for _ in range(50):  # a lock being written or taken over by another: look again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_holder(path)
            if held is None:  # released meanwhile
                continue
            if held == {} and time.time() - _mtime(path) < 5:  # being written right now
                time.sleep(0.2)
                continue
            if not _stale(held, host, job):
                raise data.DataError(
                    f"{path}: locked by {describe(held)} since {held.get('since')}; wait for it "
                    f"to finish or use another output (delete the lock only if that run is gone)"
                ) from None
            _take_over(path, held)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f)
        return rec
    raise data.DataError(f"{path}: could not take the lock (others keep taking it); retry")


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _take_over(path, held):
    """Move a stale lock aside (one rename wins); if what was moved is not the stale record seen
    (someone took over first), put it back."""
    aside = f"{path}.stale{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if read_holder(aside) != held:  # another process's fresh lock: restore it (link: no clobber)
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        print(f"note: {path}: taking over the stale lock of {describe(held)}", file=sys.stderr)
    os.remove(aside)


def release(path, pid=None):
    """Remove the lock if this process (or `pid`) holds it; never another holder's."""
    pid = os.getpid() if pid is None else int(pid)
    held = read_holder(path)
    if held and held.get("pid") == pid and held.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(path, what):
    """Hold the lock for the with-block; released however it ends (an exception, sys.exit). A
    folder made for the lock and left empty is removed: a refused run leaves nothing behind."""
    folder = os.path.dirname(os.path.abspath(path))
    made = not os.path.isdir(folder)
    acquire(path, what)
    try:
        yield path
    finally:
        release(path)
        if made:
            with contextlib.suppress(OSError):  # not empty: the run's outputs
                os.rmdir(folder)


def main(argv=None):
    p = argparse.ArgumentParser("locks", description="take or release an output lock")
    p.add_argument("action", choices=("acquire", "release"), help="what to do")
    p.add_argument("path", help="the lock file")
    p.add_argument("--pid", type=int, default=None, help="holder pid (default: this process)")
    p.add_argument("--what", default="a run", help="the holder's name in error messages")
    args = p.parse_args(argv)
    try:
        if args.action == "acquire":
            acquire(args.path, args.what, args.pid)
        else:
            release(args.path, args.pid)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
