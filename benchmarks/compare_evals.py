"""Several `python -m kairos_jax.evaluate` results side by side: a markdown table and one PNG.

    PYTHONPATH=. python benchmarks/compare_evals.py hybrid=runs/abl3k_hybrid/eval_long \\
        swa=runs/abl3k_swa/eval_long ... [--png=benchmarks/figures/ablation_mixers_long.png] \\
        [--title=TEXT] [--steps=8]

Each argument is LABEL=DIR, DIR holding an eval.json. The table gives, per robot source, the
simulate (actions given) PSNR averaged over horizon steps 1..--steps, over every step, and at the
last step, for each run and for the baselines of the first run (copy-last-frame, linear
extrapolation). The runs must have been evaluated on the same clips (same data root, horizon,
context and clip count): checked. The PNG has one panel per source, PSNR per horizon step.
"""

from __future__ import annotations

import argparse
import json
import os

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194),
          (188, 189, 34), (23, 190, 207)]
BASELINES = (("copy_last", "copy-last", (127, 127, 127)), ("linear", "linear", (255, 127, 14)))


def load(arg: str) -> tuple[str, dict]:
    if "=" not in arg:
        raise SystemExit(f"error: {arg!r}: expected LABEL=DIR")
    label, path = arg.split("=", 1)
    file = os.path.join(path, "eval.json")
    if not os.path.exists(file):
        raise SystemExit(f"error: {file}: missing (run python -m kairos_jax.evaluate --out={path})")
    with open(file) as f:
        return label, json.load(f)


def summary(ys: list[float], steps: int) -> str:
    head = ys[:steps]
    return f"{sum(head) / len(head):.2f} / {sum(ys) / len(ys):.2f} / {ys[-1]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=DIR with DIR/eval.json")
    ap.add_argument("--png", default=None)
    ap.add_argument("--title", default="simulate PSNR (dB) per horizon step")
    ap.add_argument("--steps", type=int, default=8, help="the first average is over steps 1..steps")
    args = ap.parse_args()
    runs = [load(a) for a in args.runs]
    first = runs[0][1]
    sources = sorted(first["sources"])
    for label, r in runs[1:]:
        for s in sources:
            a, b = first["sources"][s], r["sources"].get(s)
            if b is None or (a["clips"], a["context"], a["horizon"]) != (b["clips"], b["context"], b["horizon"]) \
                    or r["data_root"] != first["data_root"]:
                raise SystemExit(f"error: {label}: not evaluated on the same clips as {runs[0][0]} ({s})")
            if b["copy_last_psnr_by_step"] != a["copy_last_psnr_by_step"]:
                raise SystemExit(f"error: {label}: copy-last differs from {runs[0][0]}'s on {s}: other clips")
    s0 = first["sources"][sources[0]]
    n = len(s0["simulate_psnr_by_step"])
    print(f"Simulate PSNR (dB), mean over steps 1-{args.steps} / mean over steps 1-{n} / step {n}; "
          f"{s0['clips']} clips per source, {s0['context']} context blocks, data {first['data_root']}")
    print()
    print("| run | " + " | ".join(sources) + " |")
    print("| --- |" + " ---: |" * len(sources))
    for label, r in runs:
        print(f"| {label} | " + " | ".join(summary(r["sources"][s]["simulate_psnr_by_step"], args.steps)
                                        for s in sources) + " |")
    for key, name, _ in BASELINES:
        print(f"| {name} | " + " | ".join(summary(first["sources"][s][f"{key}_psnr_by_step"], args.steps)
                                         for s in sources) + " |")
    if args.png:
        from kairos_jax.inference import media

        panels = []
        for s in sources:
            series = [(label, r["sources"][s]["simulate_psnr_by_step"], COLORS[i % len(COLORS)])
                      for i, (label, r) in enumerate(runs)]
            series += [(name, first["sources"][s][f"{key}_psnr_by_step"], color) for key, name, color in BASELINES]
            panels.append({"label": f"{s}", "series": series})
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        media.plot_series(args.png, panels, args.title, width=760, panel_height=220)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
