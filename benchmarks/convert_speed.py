"""Conversion at scale (issue #17, item 4): the converter's parallel workers against one process.

    PYTHONPATH=. python benchmarks/convert_speed.py [--source=data/small/reacher] [--episodes=96] \\
        [--workers=1,2] [--episodes_per_shard=8] [--workdir=DIR] [--json=FILE]

Builds the input once: `--episodes` episodes of one of our sources (default: data/small's reacher,
`python -m data_pipelines.generate --preset=small --output=data/small`) written as a LeRobot v3.0
dataset (data_pipelines.writers.write_lerobot: parquet + one H.264 stream per file, the layout of
today's Hub datasets). Then runs, each as its own `python -m data_pipelines.convert --format=lerobot`
process into a fresh output folder, one conversion per --workers value, and last a re-run of the
largest into its finished folder (the resume path: every shard skipped). Each figure is the
converter's own JSON summary (episodes/s and MB/s of raw episode records written, wall seconds of
the whole process including start-up), and the ratio to the first --workers value, measured side by
side in this one run. The outputs are checked to hold the same episodes and frames.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_input(source: str, episodes: int, out: str) -> dict:
    from data_pipelines.readers.shards import ShardReader
    from data_pipelines.writers import write_lerobot

    reader = ShardReader(source)
    keys = list(reader.keys())[:episodes]
    if len(keys) < episodes:
        raise SystemExit(f"error: {source} holds {len(keys)} episodes, fewer than --episodes={episodes}")
    eps = [reader.read(k) for k in keys]
    write_lerobot(eps, out, version="v3.0")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return {"episodes": len(eps), "frames": int(sum(len(e.frames) for e in eps)), "bytes_on_disk": size}


def run_convert(inp: str, out: str, workers: int, episodes_per_shard: int) -> dict:
    cmd = [sys.executable, "-m", "data_pipelines.convert", "--format=lerobot", f"--input={inp}",
           f"--output={out}", f"--workers={workers}", f"--episodes_per_shard={episodes_per_shard}",
           "--no_progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["process_wall_s"] = wall
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=os.path.join(REPO, "data", "small", "reacher"))
    ap.add_argument("--episodes", type=int, default=96)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--episodes_per_shard", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    work = args.workdir or tempfile.mkdtemp(prefix="kairos-convert-bench-")
    inp = os.path.join(work, "lerobot_v3")
    if not os.path.exists(os.path.join(inp, "meta", "info.json")):
        made = build_input(args.source, args.episodes, inp)
    else:
        made = {"episodes": args.episodes, "reused": True}
    runs = []
    for w in workers:
        out = os.path.join(work, f"shards_w{w}")
        if os.path.exists(out):
            raise SystemExit(f"error: {out} exists; give a fresh --workdir")
        runs.append(("convert", w, run_convert(inp, out, w, args.episodes_per_shard)))
    resumed = run_convert(inp, os.path.join(work, f"shards_w{workers[-1]}"), workers[-1], args.episodes_per_shard)
    runs.append(("re-run (resume)", workers[-1], resumed))
    first = runs[0][2]
    for _, _, s in runs:
        if (s["episodes"], s["frames"]) != (first["episodes"], first["frames"]):
            raise SystemExit(f"error: outputs differ: {s['episodes']}/{s['frames']} vs "
                             f"{first['episodes']}/{first['frames']} episodes/frames")
    print(f"input: {inp} ({made}); machine: {platform.machine()}, {os.cpu_count()} CPUs")
    print("| run | workers | shards done / resumed | episodes | episodes/s | MB/s | process wall s | "
          "episodes/s vs 1st |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, w, s in runs:
        ratio = s["episodes_per_s"] / first["episodes_per_s"] if s["episodes_per_s"] else 0.0
        done = s["shards_total"] - s["shards_resumed"]
        print(f"| {name} | {w} | {done} / {s['shards_resumed']} | {s['episodes']} | {s['episodes_per_s']:.2f} | "
              f"{s['mb_per_s']:.2f} | {s['process_wall_s']:.1f} | {ratio:.2f}x |")
    result = {"input": made, "runs": [{"run": n, "workers": w, **s} for n, w, s in runs]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({"episodes_per_s": {f"{n}/w{w}": s["episodes_per_s"] for n, w, s in runs}}))


if __name__ == "__main__":
    main()
