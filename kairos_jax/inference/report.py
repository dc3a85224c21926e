"""The evaluation's files (kairos_jax.evaluate): eval.json, report.md (the tables) and the plots, into a
folder or a remote URL. Kept apart from the CLI so that library code and tests can write a report
without defining its flags."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from data_pipelines import storage
from kairos_jax.inference import media


def write_outputs(result: dict, out: str, title: str) -> None:
    """eval.json, report.md and the plots into `out`: a folder, or a gs:// (or other remote) URL,
    beside a remote checkpoint by default, where they are written locally first and uploaded."""
    if not storage.is_remote(out):
        os.makedirs(out, exist_ok=True)
        write_report(result, out, title)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    with tempfile.TemporaryDirectory(prefix="kairos-eval-") as local:
        write_outputs(result, local, title)
        storage.upload_folder(local, out)


def write_report(result: dict, out: str, title: str) -> None:
    """report.md, psnr_<source>.png and frames_<source>.png from an evaluate() result."""
    lines = [f"# {title}", "", "## Open loop (held-out episodes)", "",
             "| source | step | simulate PSNR | video pred. PSNR | copy-last PSNR | linear PSNR | simulate SSIM |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    colors = {"simulate": (200, 30, 30), "video_prediction": (230, 140, 20), "copy_last": (110, 110, 110),
              "linear": (30, 30, 200)}
    for source, r in result["sources"].items():
        get = lambda key, s, r=r: f"{r[key][s]:.2f}" if key in r else "-"
        for s in range(r["horizon"]):
            lines.append(f"| {source} | {s + 1} | {get('simulate_psnr_by_step', s)} | "
                         f"{get('video_prediction_psnr_by_step', s)} | {get('copy_last_psnr_by_step', s)} | "
                         f"{get('linear_psnr_by_step', s)} | {get('simulate_ssim_by_step', s)} |")
        media.plot_series(os.path.join(out, f"psnr_{source}.png"), [
            {"label": "PSNR (dB) per horizon step",
             "series": [(name, r[f"{name}_psnr_by_step"], c) for name, c in colors.items()
                        if f"{name}_psnr_by_step" in r]}], title=f"{source}: held-out, {r['clips']} clips")
        if "sample_frames" in r:
            sample = r.pop("sample_frames")
            strip = np.concatenate([np.concatenate(list(sample["truth"]), axis=1),
                                    np.concatenate(list(sample["simulate"]), axis=1)], axis=0)
            from PIL import Image

            Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(
                os.path.join(out, f"frames_{source}.png"))
    lines += ["", "| source | policy MSE | inverse dyn. MSE | BC MSE | zero MSE | mean-action MSE |",
              "| --- | --- | --- | --- | --- | --- |"]
    for source, r in result["sources"].items():
        cell = lambda key, r=r: f"{r[key]:.4f}" if key in r else "-"
        lines.append(f"| {source} | {cell('policy_action_mse')} | {cell('inverse_dynamics_action_mse')} | "
                     f"{cell('bc_action_mse')} | {cell('zero_action_mse')} | {cell('mean_action_mse')} |")
    if result["closed_loop"]:
        lines += ["", "## Closed loop (task success)", "",
                  "| robot | episodes | model | BC | scripted expert | random |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in result["closed_loop"].items():
            cell = lambda key, r=r: f"{r[key]:.2f}" if key in r else "-"
            lines.append(f"| {name} | {r['episodes']} | {cell('success_rate')} | {cell('bc_success_rate')} | "
                         f"{cell('expert_success_rate')} | {cell('random_success_rate')} |")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
