"""benchmarks/gpu.py: its --smoke run on CPU (what the GPU run does, at tiny sizes), with only the
packages the GPU machine has, and its table written from the JSON a run leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
# Run as on the GPU machine (PYTHONPATH=. from the root), then report what it imported.
RUNNER = """
import runpy, sys
sys.argv = ["benchmarks/gpu.py", *sys.argv[1:]]
try:
    runpy.run_path("benchmarks/gpu.py", run_name="__main__")
    code = 0
except SystemExit as stop:
    code = stop.code
print("IMPORTED", sorted({name.split(".")[0] for name in sys.modules}))
sys.exit(code)
"""
RESULTS = "# Results\n\n<!-- gpu-benchmark:start -->\nold\n<!-- gpu-benchmark:end -->\n"


def test_smoke_run_writes_json_and_the_results_block(tmp_path):
    results = tmp_path / "results.md"
    results.write_text(RESULTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", RUNNER, "--smoke", "--out", str(tmp_path / "out"), "--write-results", str(results)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = done.stdout.rsplit("IMPORTED", 1)[1]
    for absent_on_the_gpu_machine in ("polars", "dagster", "mlflow"):
        assert f"'{absent_on_the_gpu_machine}'" not in imported
    run = json.loads((tmp_path / "out" / "gpu_benchmark.json").read_text())
    assert run["environment"]["smoke"] and not run["errors"]
    assert [row["batch"] for row in run["generation"]["rows"]] == [1, 2]
    # min_new_tokens = max_new_tokens: random weights generate exactly that many tokens.
    assert all(row["new_tokens_per_listing"] == run["generation"]["max_new_tokens"] for row in run["generation"]["rows"])
    assert run["vlm2vec_training"]["samples_per_s"] > 0 and all(map(float, run["vlm2vec_training"]["losses"]))
    assert run["search"]["self_found_first"] == 1.0
    table = results.read_text()
    assert "old" not in table and "Smoke run" in table and "VLM2Vec encoder AGCL training step" in table
    # The lead writes docs/results.md from a GPU run's JSON on another machine.
    results.write_text(RESULTS)
    again = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(tmp_path / "out" / "gpu_benchmark.json"),
                            "--write-results", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert results.read_text() == table
