"""Training throughput quiet vs with CPU-bound neighbours: ``fastp2p bench train --contention``.

Runs the main job (``fastp2p train --preset debug``, a few dozen steps, in a subprocess so each run sets its threads
afresh) alternately quiet and beside ``N`` busy-loop processes (``python -c "while True: pass"``), ``--rounds``
times each, and reports the median steady-state img/s of each condition and the slowdown (quiet / contended).
Steady state: the ``metrics.jsonl`` windows after the first one (the first holds start-up and the first step).

    python -m fastp2p.bench.contention [--steps 60] [--rounds 3] [--neighbours 1] [--env K=V ...] [--json PATH]

``--env K=V`` sets an environment variable for the training job only (A/B runs: ``OMP_NUM_THREADS=2``,
``OMP_WAIT_POLICY=active``); the neighbours run with a plain environment. The table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "while True: pass"


def steady_img_per_s(metrics: Path) -> float | None:
    """Median img/s of the ``metrics.jsonl`` windows after the first; None when fewer than two windows."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["img_per_s"] for r in rows[1:] if "img_per_s" in r]
    return statistics.median(rates) if rates else None


def train_once(steps: int, log_every: int, env: dict, work: Path) -> dict:
    """One ``fastp2p train --preset debug`` run; its steady img/s, wall time and the threads it chose."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    cmd = [sys.executable, "-m", "fastp2p", "train", "--preset", "debug", "--max_steps", str(steps), "--log_every",
           str(log_every), "--out", str(out), "--name", "c", "--no_progress"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"training failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return {"img_per_s": steady_img_per_s(out / "c" / "metrics.jsonl"), "wall_s": wall,
            "summary_img_per_s": json.loads(p.stdout)["img_per_s"]}


def measure(steps: int = 60, log_every: int = 10, rounds: int = 3, neighbours: int = 1,
            extra_env: dict | None = None, log=print) -> dict:
    """Quiet and contended runs, alternating round by round (load from elsewhere hits both alike)."""
    env = {**os.environ, **(extra_env or {})}
    runs: dict[str, list[dict]] = {"quiet": [], "contended": []}
    with tempfile.TemporaryDirectory(prefix="fastp2p-contention-") as t:
        work = Path(t)
        for i in range(rounds):
            for cond in ("quiet", "contended"):
                busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(neighbours if
                                                                                      cond == "contended" else 0)]
                try:
                    load = os.getloadavg()[0]
                    r = train_once(steps, log_every, env, work)
                finally:
                    for b in busy:
                        b.kill()
                        b.wait()
                r.update(load_1min_before=load)
                runs[cond].append(r)
                log(f"[contention] round {i + 1}/{rounds} {cond}: {r['img_per_s']:.2f} img/s "
                    f"(wall {r['wall_s']:.1f} s, load {load:.2f})")
    med = {c: statistics.median(r["img_per_s"] for r in rs) for c, rs in runs.items()}
    from fastp2p.perf import available_cores, thread_plan

    cores = available_cores()
    return {"schema": "fastp2p.bench.contention/1", "steps": steps, "log_every": log_every, "rounds": rounds,
            "neighbours": neighbours, "env": extra_env or {}, "cores": cores,
            "plan": dict(zip(("intra_op_threads", "num_workers"), thread_plan(1, cores), strict=True)),
            "median_img_per_s": med, "slowdown": med["quiet"] / med["contended"], "runs": runs,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def print_table(res: dict) -> None:
    print(f"\nfastp2p train --preset debug, {res['steps']} steps, {res['cores']} cores, "
          f"{res['neighbours']} busy neighbour(s), env {res['env'] or '-'}")
    head = f"{'condition':<12}{'median img/s':>14}{'runs img/s':>30}{'load before':>14}"
    print(head)
    print("-" * len(head))
    for cond, rs in res["runs"].items():
        each = " ".join(f"{r['img_per_s']:.2f}" for r in rs)
        loads = " ".join(f"{r['load_1min_before']:.1f}" for r in rs)
        print(f"{cond:<12}{res['median_img_per_s'][cond]:>14.2f}{each:>30}{loads:>14}")
    print(f"slowdown (quiet / contended): {res['slowdown']:.2f}x")


def _env_pair(v: str) -> tuple[str, str]:
    if "=" not in v:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {v!r}")
    k, _, val = v.partition("=")
    return k, val


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--rounds", type=int, default=3, help="runs per condition, alternating (default 3)")
    p.add_argument("--neighbours", type=int, default=1, help="busy-loop processes beside the job (default 1)")
    p.add_argument("--env", type=_env_pair, action="append", default=[], metavar="K=V",
                   help="environment variable for the training job only (repeatable)")


def run(args, json_path: str | None = None) -> int:
    res = measure(args.steps, 10, args.rounds, args.neighbours, dict(args.env),
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2) + "\n")
        print(f"JSON: {json_path}", file=sys.stderr)
    print_table(res)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastp2p.bench.contention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--json", default=None, metavar="PATH", help="write every run here")
    args = p.parse_args(argv)
    return run(args, args.json)


if __name__ == "__main__":
    sys.exit(main())
