"""The demo: train under torchrun, kill -9 it mid-run, resume, and prove nothing was lost.

    python launch/demo.py [--workdir runs/demo] [--steps 120] [--save-every 10] [--nproc 2]

1. an uninterrupted reference run;
2. the same job, SIGKILLed (torchrun and every worker) once a few checkpoints are committed;
3. a restart that resumes from the newest committed step;
and checks that the resumed run's final parameters equal the reference's bit for bit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")


def torchrun(args: argparse.Namespace, ckpt_dir: str, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        os.path.join(HERE, "train.py"),
        "--ckpt-dir",
        ckpt_dir,
        "--steps",
        str(args.steps),
        "--save-every",
        str(args.save_every),
        "--mode",
        args.mode,
        *(["--async-save"] if args.async_save else []),
        "--snapshot",
        args.snapshot,
        *(extra or []),
    ]


def run_to_end(cmd: list[str], log_path: str) -> tuple[int, str]:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    sys.stdout.write(_indent(proc.stdout))
    match = FINAL.search(proc.stdout)
    if proc.returncode != 0 or not match:
        sys.exit(f"training failed (exit {proc.returncode}); see {log_path}")
    return int(match.group(1)), match.group(2)


def committed(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d{12}", n)]
    return sorted(int(n[5:]) for n in names if os.path.exists(os.path.join(ckpt_dir, n, "manifest.json")))


def run_and_kill(cmd: list[str], ckpt_dir: str, kill_after: int, log_path: str) -> None:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not any(s >= kill_after for s in committed(ckpt_dir)):
            if proc.poll() is not None:
                sys.exit(f"the job ended before step {kill_after} was committed; see {log_path}")
            if time.monotonic() > deadline:
                kill_tree(proc.pid)
                sys.exit("timed out waiting for a checkpoint")
            time.sleep(0.05)
        time.sleep(0.3)  # land somewhere inside the next steps, possibly mid-save
        status = kill_tree(proc.pid)  # torchrun and all its workers at once, no goodbye
        proc.wait()  # already reaped by kill_tree: its status is the one that counts
    print(f"  killed with SIGKILL (exit {status}); committed steps on disk: {committed(ckpt_dir)}")
    leftovers = [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp-")]
    if leftovers:
        print(f"  uncommitted leftovers (never listed, cleaned on restart): {leftovers}")


def kill_tree(pid: int) -> int | None:
    """SIGKILL a process and all its descendants (torchrun's workers run in their own sessions).
    Returns the process's exit status as ``Popen`` reports it (``-9`` when the kill took),
    which psutil reaps here before ``Popen.wait`` could see it."""
    root = psutil.Process(pid)
    procs = root.children(recursive=True) + [root]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    gone, _ = psutil.wait_procs(procs, timeout=30)
    return next((int(p.returncode) for p in gone if p.pid == pid and p.returncode is not None), None)


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--mode", choices=["sharded", "chief"], default="sharded")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--snapshot", choices=["now", "overlap"], default="now", help="with --async-save (see train.py)")
    p.add_argument("--step-sleep", type=float, default=0.02)
    args = p.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    ref_dir, run_dir = os.path.join(args.workdir, "reference"), os.path.join(args.workdir, "interrupted")

    print(f"[1/3] uninterrupted reference run: {args.nproc} ranks, {args.steps} steps")
    ref_step, ref_hash = run_to_end(torchrun(args, ref_dir), os.path.join(args.workdir, "reference.log"))

    kill_after = max(args.save_every, (args.steps // 2) // args.save_every * args.save_every)
    print(f"[2/3] same job, SIGKILLed after step {kill_after} is committed")
    pace = ["--step-sleep", str(args.step_sleep)]
    run_and_kill(torchrun(args, run_dir, pace), run_dir, kill_after, os.path.join(args.workdir, "killed.log"))

    print("[3/3] restart: resumes from the newest committed step")
    step, digest = run_to_end(torchrun(args, run_dir), os.path.join(args.workdir, "resumed.log"))

    same = (step, digest) == (ref_step, ref_hash)
    print(f"reference: step={ref_step} sha256={ref_hash}")
    print(f"resumed:   step={step} sha256={digest}")
    print("OK: the resumed run is bit-identical to the uninterrupted one" if same else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
