"""The GPU kernel benchmark runs end to end here (--smoke: tiny shapes, kernels interpreted on CPU),
so a GPU session does not spend its minutes finding a broken script."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_gpu_smoke_checks_kernels_against_xla_and_fails_on_disagreement(tmp_path):
    out = tmp_path / "kernels.json"
    # An impossible tolerance: the script must still measure and write everything, then fail
    # and name what disagreed.
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernels_gpu.py", "--smoke", "--lengths=100", "--warmup=0",
         "--iters=1", "--max-relerr=1e-7", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "kernels disagree with the chunked XLA path" in proc.stderr, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["device"] == "cpu"
    (gdn,), (wa,) = result["gated_delta_rule"], result["window_attention"]
    assert gdn["T"] == 100 and wa["T"] == 96          # window attention: whole blocks of 32
    # bf16 inputs and outputs: the kernels agree with the XLA path to bf16 rounding, not exactly
    for row in (gdn, wa):
        assert 1e-7 < row["pallas_vs_chunked_relerr"] < 1e-2, row
        assert row["pallas_fwd_s"] > 0 and row["pallas_fwd_bwd_s"] > 0
    assert gdn["chunked_xla_fwd_s"] > 0 and "cudnn_local_fwd_s" not in wa   # cuDNN only on a GPU


def test_kernels_gpu_refuses_cpu_without_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/kernels_gpu.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]


def test_convert_speed_converts_with_each_worker_count_then_resumes(tiny_data_dir, tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/convert_speed.py", f"--source={tiny_data_dir}/reacher", "--episodes=3",
         "--workers=1,2", "--episodes_per_shard=1", f"--workdir={tmp_path / 'work'}", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["run"], r["workers"]) for r in runs] == [("convert", 1), ("convert", 2), ("re-run (resume)", 2)]
    for r in runs:
        assert r["episodes"] == 3 and r["shards_total"] == 3 and not r["skipped"], r
    assert [r["shards_resumed"] for r in runs] == [0, 0, 3]
    assert runs[0]["episodes_per_s"] > 0 and runs[0]["mb_per_s"] > 0
    assert "| convert | 2 |" in proc.stdout
