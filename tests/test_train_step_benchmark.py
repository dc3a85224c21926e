"""The one-GPU train-step benchmark (benchmarks/train_step_gpu.py) runs end to end here in --smoke mode
(embedded config, float32, CPU), so a GPU session can run it in one call."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_step_gpu.py", "--smoke", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and len(result["runs"]) == 1
    run = result["runs"][0]
    assert run["config"] == "embedded" and run["step_s"] > 0 and run["tokens_per_s"] > 0
    assert 0 < run["mfu"] < 1 and run["skipped"] == 0 and run["estimated_step_s"] > 0
    assert run["model_flops_per_step"] > 6 * run["params"] * run["tokens_per_step"] * 0.5


def test_train_step_benchmark_refuses_cpu_without_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/train_step_gpu.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0 and "needs" not in proc.stdout and "CUDA GPU" in proc.stderr
