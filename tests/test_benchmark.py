"""The benchmark harness (benchmarks/run.py) end to end on the tiny random model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("trl")


def test_benchmark_runs_every_contender_on_the_same_tokens(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "run.py"), "--model", str(tiny_model_dir),
            "--examples", "8", "--sequence-len", "256", "--length-scale", "0.05",
            "--micro-batch-size", "4", "--matmul-size", "512", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"tunelab", "trl", "plain", "unsloth"}
    trained = [rows[n] for n in ("tunelab", "trl", "plain")]
    for row in trained:
        assert row["tokens_per_s"] > 0 and row["epoch_s"] > 0 and row["first_step_s"] > 0
        assert row["peak_memory_mb"] > 0 and row["mfu"] > 0
        assert math.isfinite(row["loss_mean"]) and math.isfinite(row["loss_last"])
        assert math.isfinite(row["heldout_loss"])  # the trained model scored on held-out rows
        assert row["steps"] == 2  # 8 examples, batch 4
    assert len({row["tokens"] for row in trained}) == 1, [r["tokens"] for r in trained]
    assert trained[0]["tokens"] == result["meta"]["sample_tokens"]
    assert "skipped" in rows["unsloth"]
    table = (out / "results.md").read_text()
    assert "tunelab/trl:" in table and "tunelab/plain:" in table
    assert "tunelab/trl:" in done.stdout.splitlines()[-4] + done.stdout.splitlines()[-3]
