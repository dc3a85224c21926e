"""kill -9 at random points of a real training run, then the same command: is the finished run bit for
bit the uninterrupted one?

    PYTHONPATH=. python benchmarks/faults.py [--trials=10] [--kills_per_trial=1] [--seed=0] \\
        [--out=benchmarks/faults.json] [--data=DIR] [--workdir=DIR]

One uninterrupted reference run of the tiny two-phase curriculum (tests/fault_injection.py: async
checkpoints as in production, a checkpoint every 2 steps), then `--trials` runs, each SIGKILLed at
`--kills_per_trial` random points and restarted after each kill until it finishes. A point is drawn
as (kind, phase, step): kind cycles through "step" (after the metrics line of a random step),
"checkpoint" (while a random later save is in flight: its `.orbax-checkpoint-tmp` folder exists) and
"data" (while that folder holds the data iterator's item), the phase and step at random. A kill that
misses its point (the save committed first) is retried at the next save. A trial passes when its exit
status is 0 and its loss curve (every field of metrics.jsonl but the timings) and exported parameters
equal the reference's bit for bit. Prints one line per trial and a summary; writes the JSON report;
exits 1 unless every trial passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import fault_injection as fi  # noqa: E402


def plan(rng: random.Random, trial: int, kills: int) -> list[fi.Kill]:
    out = []
    for j in range(kills):
        kind = fi.KINDS[(trial * kills + j) % len(fi.KINDS)]
        phase = rng.choice(fi.PHASES)
        steps = fi.STEPS[phase]
        # step: after the metrics line of 1..steps-1; a save: of a step > after (saves at 2, 4, ...)
        after = rng.randrange(1, steps) if kind == "step" else rng.randrange(0, steps - 1, 2)
        out.append(fi.Kill(kind, phase, after))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--kills_per_trial", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/faults.json")
    p.add_argument("--data", default=None, help="tiny data folder (default: generated into the workdir)")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder, removed)")
    args = p.parse_args()

    root = args.workdir or tempfile.mkdtemp(prefix="kairos_faults_")
    os.makedirs(root, exist_ok=True)
    data = args.data or os.path.join(root, "data")
    if not os.path.isdir(data):
        from data_pipelines.generate import generate

        generate("tiny", data, seed=0)
    t0 = time.perf_counter()
    ref = os.path.join(root, "reference")
    shutil.rmtree(ref, ignore_errors=True)
    rc = fi.run(data, ref, os.path.join(root, "reference.log"))
    if rc != 0:
        print(f"error: the reference run failed with status {rc} (see {root}/reference.log)", file=sys.stderr)
        return 1
    print(f"reference run: {time.perf_counter() - t0:.0f} s")

    rng = random.Random(args.seed)
    trials = []
    for i in range(args.trials):
        workdir, log = os.path.join(root, f"trial_{i:02d}"), os.path.join(root, f"trial_{i:02d}.log")
        shutil.rmtree(workdir, ignore_errors=True)
        t = time.perf_counter()
        rc, kills = fi.killed_run(data, workdir, log, plan(rng, i, args.kills_per_trial))
        diffs = fi.differences(ref, workdir, data) if rc == 0 else [f"exit status {rc}"]
        landed = [k for k in kills if k.landed]
        row = {"trial": i, "exit_status": rc, "identical": not diffs, "differences": diffs[:5],
               "kills": [dataclasses.asdict(k) for k in kills], "landed": len(landed),
               "seconds": round(time.perf_counter() - t, 1)}
        trials.append(row)
        print(f"trial {i}: {'identical' if not diffs else 'DIFFERS'}; "
              + "; ".join(f"{k.kind} kill in {k.phase}: {k.where}" for k in kills), flush=True)

    passed = sum(t["identical"] for t in trials)
    aimed = sum(len(t["kills"]) for t in trials)
    landed = sum(t["landed"] for t in trials)
    by_kind = {kind: sum(1 for t in trials for k in t["kills"] if k["kind"] == kind and k["landed"])
               for kind in fi.KINDS}
    summary = {"trials": len(trials), "identical": passed, "kills_landed": landed, "kill_attempts": aimed,
               "landed_by_kind": by_kind, "seconds": round(time.perf_counter() - t0, 1), "seed": args.seed}
    print(f"{passed} of {len(trials)} killed runs ended bit for bit equal to the uninterrupted run "
          f"({landed} kills landed where aimed, of {aimed} attempts: {by_kind})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "trials": trials}, f, indent=1)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
