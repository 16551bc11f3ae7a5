"""
run_cv.sh on a Slurm cluster through submitit: the extraction as one job, the folds as a job array
that depends on it, then the ensemble test + aggregate as one job after the array.

    pip install -r requirements-cluster.txt
    python submit.py --partition gpu --time 240 --gpus_per_node 1 --constraint a100 \
        --account myproj                               # the real run (run_cv.sh's settings)
    RUN=outputs/bits32 python submit.py --partition gpu -- -- --bits 32   # after --: run_cv.sh's
    python submit.py --cluster local -- --demo         # the same jobs as local processes (a test)

Which commands run is run_cv.sh's to say (PLAN=1 bash run_cv.sh ...: its data, demo and splits
steps run here, the rest print their command lines), so the outputs and the resume rules are
run_cv.sh's: a fold with .done is not submitted, one with last.pt resumes (--resume), the test +
aggregate step only when something changed. A rerun submits only what is unfinished, nothing once
all is done. An existing feature cache is checked here (extract_features.py answers "up to date"
in seconds) instead of by a job.

Preemption: Slurm sends SIGUSR2 (submitit's --signal) shortly before a timeout or preemption; the
job's checkpoint hook passes it on as SIGUSR1 to train.py / extract_features.py, which stop at
their next safe point (train.py: last.pt of the last finished epoch; extraction: the finished
shards), and submitit requeues the job with --resume. A job that exits 75 (preempted by a bare
SIGTERM, no requeue) fails with that note: rerun submit.py and it resumes. Job logs: --folder.
"""

import os
import shlex
import signal
import subprocess
import sys
import time

import cli
import data
import preempt

ROOT = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    p = cli.Parser("submit", description="run_cv.sh's pipeline as Slurm jobs through submitit")
    g = p.add_argument_group("slurm")
    g.add_argument(
        "--cluster",
        choices=("slurm", "local", "debug"),
        default=None,
        help="submitit executor (default: slurm when sbatch is on PATH, else local)",
    )
    g.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    g.add_argument("--account", default=None, help="Slurm account to charge (default: yours)")
    g.add_argument("--constraint", default=None, help="Slurm node features, e.g. a100")
    g.add_argument("--qos", default=None, help="Slurm quality of service")
    g.add_argument("--time", type=cli.positive_int, default=240, help="minutes per job")
    g.add_argument(
        "--gpus_per_node",
        type=cli.nonneg_int,
        default=None,
        help="GPUs per job (default: 1 on slurm, 0 on local)",
    )
    g.add_argument("--cpus_per_task", type=cli.positive_int, default=8, help="CPU cores per job")
    g.add_argument("--mem_gb", type=cli.positive_int, default=64, help="memory per job, GB")
    g.add_argument("--array_parallelism", type=cli.positive_int, default=16, help="folds at once")
    g.add_argument("--folder", default="logs/submitit", help="submitit's job folder (logs)")
    g.add_argument(
        "--wait", action="store_true", help="wait for the jobs (always with --cluster local)"
    )
    return p


def parse(argv):
    """submit.py's flags, then after the first -- run_cv.sh's arguments (kept as they are, a second
    -- included) -> args with run_cv_args."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args = get_args_parser().parse_args(argv[:cut])
    args.run_cv_args = argv[cut + 1 :]
    return args


# ---------------------------------------------------------------------------- the plan


def plan(run_cv_args, env=None):
    """PLAN=1 bash run_cv.sh ARGS -> [(step name, argv)] of the steps left (features, fold k,
    ensemble test, aggregate); run_cv.sh's own errors stop here with its message."""
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "run_cv.sh"), *run_cv_args],
        env=dict(env or os.environ, PLAN="1"),
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise data.DataError(f"run_cv.sh's plan stopped: {last.removeprefix('error: ')}")
    steps = []
    for line in r.stdout.splitlines():
        if line.startswith("plan\t"):
            _, name, *argv = line.split("\t")
            steps.append((name, argv))
    return steps


class Step:
    """One job: run a step's command line in the repository (stdout/stderr to the job's log, or the
    step's own log for `logged LOG cmd...`); a fold's .done once it exits 0, as run_cv.sh does.
    submitit calls checkpoint() on its timeout / preemption signal: SIGUSR1 to the command, wait
    for its checkpoint, then the same command (with --resume for train.py) to requeue."""

    def __init__(self, name, argvs):
        self.name, self.argvs, self.proc = name, argvs, None

    def __call__(self):
        for argv in self.argvs:
            log = None
            if argv[0] == "logged":  # run_cv.sh's logged LOG CMD...: the output into LOG
                log, argv = argv[1], argv[2:]
            out = open(os.path.join(ROOT, log), "w") if log else None  # else: the job's log
            try:
                self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out)
                # poll, not wait(): wait() holds the lock checkpoint()'s wait needs, and
                # checkpoint() runs in a signal handler of this thread
                while self.proc.poll() is None:
                    time.sleep(0.2)
                rc = self.proc.returncode
            finally:
                if out:
                    out.close()
            if rc == preempt.REQUEUE_EXIT:
                raise RuntimeError(
                    f"{self.name}: preempted (exit {rc}); rerun submit.py to resume it"
                )
            if rc != 0:
                raise RuntimeError(f"{self.name}: {shlex.join(argv)} failed with exit {rc}")
            if argv[1:2] == ["train.py"]:
                out = argv[argv.index("--out_dir") + 1]
                open(os.path.join(ROOT, out, ".done"), "w").close()
        return self.name

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # the script's own preemption path
            try:
                self.proc.wait(timeout=60)  # Slurm's warning: 90 s before
            except subprocess.TimeoutExpired:
                self.proc.kill()
        again = [
            a + ["--resume"] if a[1:2] == ["train.py"] and "--resume" not in a else a
            for a in self.argvs
        ]
        return submitit.helpers.DelayedSubmission(Step(self.name, again))


# ---------------------------------------------------------------------------- submission


def executor(args, name):
    import submitit

    ex = submitit.AutoExecutor(folder=os.path.join(args.folder, "%j"), cluster=args.cluster)
    slurm = {
        k: v
        for k, v in dict(
            slurm_partition=args.partition,
            slurm_account=args.account,
            slurm_constraint=args.constraint,
            slurm_qos=args.qos,
        ).items()
        if v is not None
    }
    ex.update_parameters(
        name=name,
        timeout_min=args.time,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        slurm_array_parallelism=args.array_parallelism,
        **slurm,
    )
    return ex


def after(ex, jobs, wait):
    """Start the next stage after `jobs`: a Slurm dependency, or (local / --wait) wait for them."""
    if not jobs:
        return
    if wait:
        for j in jobs:
            j.result()  # a failed job raises its error here
        return
    ids = ":".join(j.job_id for j in jobs)
    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{ids}"})


def submit(args):
    """Plan, then submit the stages left -> {stage: [job ids]} (empty: nothing to do)."""
    own = args.run_cv_args
    own = own[: own.index("--")] if "--" in own else own  # run_cv.sh's flags, not train.py's
    if "--study" in own:
        raise data.DataError(
            "submit.py: --study is not submitted as one pipeline; submit each run: "
            "RUN=outputs/<name> python submit.py ... -- -- <its train.py flags>"
        )
    args.cluster = args.cluster or ("slurm" if _has_sbatch() else "local")
    if args.gpus_per_node is None:
        args.gpus_per_node = 1 if args.cluster == "slurm" else 0
    wait = args.wait or args.cluster != "slurm"
    steps = plan(args.run_cv_args)
    feats = [a for n, a in steps if n == "features"]
    folds = [(n, a) for n, a in steps if n.startswith("fold ")]
    final = [a for n, a in steps if n in ("ensemble test", "aggregate")]
    submitted, jobs = {}, []
    if feats and os.path.exists(_flag(feats[0], "--out")):  # up to date, or refused: seconds
        if subprocess.run(feats[0], cwd=ROOT).returncode != 0:
            raise data.DataError(
                f"{_flag(feats[0], '--out')}: extract_features.py refused it (above); pass another "
                "FEATURES or delete it"
            )
        feats = []
    ex = executor(args, "features")
    if feats:
        jobs = [ex.submit(Step("features", feats))]
        submitted["features"] = [j.job_id for j in jobs]
        print(f"submitted features: job {jobs[0].job_id}")
    after(ex, jobs, wait)
    if folds:
        ex.update_parameters(name="folds")
        with ex.batch():
            jobs = [ex.submit(Step(n, [a])) for n, a in folds]
        submitted["folds"] = [j.job_id for j in jobs]
        print(f"submitted {', '.join(n for n, _ in folds)}: jobs {', '.join(submitted['folds'])}")
        after(ex, jobs, wait)
    if final:
        ex.update_parameters(name="test_aggregate")
        jobs = [ex.submit(Step("ensemble test + aggregate", final))]
        submitted["test"] = [j.job_id for j in jobs]
        print(f"submitted ensemble test + aggregate: job {jobs[0].job_id}")
        after(ex, jobs, wait)
    if not submitted:
        print("nothing to submit: every step is done")
    return submitted


def _flag(argv, flag):
    return os.path.join(ROOT, argv[argv.index(flag) + 1])


def _has_sbatch():
    return any(
        os.access(os.path.join(d, "sbatch"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    )


def main(args):
    try:
        import submitit  # noqa: F401
    except ImportError:
        cli.fail("submit.py needs submitit: pip install -r requirements-cluster.txt")
    # the jobs unpickle Step, which imports this folder's modules
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    t0 = time.time()
    try:
        submitted = submit(args)
    except data.DataError as e:
        cli.fail(str(e))
    except RuntimeError as e:  # a job failed (local / --wait): its own message
        cli.fail(str(e).strip().splitlines()[-1])
    if submitted and (args.cluster != "slurm" or args.wait):
        print(f"all jobs finished in {time.time() - t0:.1f} s")
    return submitted


if __name__ == "__main__":
    main(parse(sys.argv[1:]))
