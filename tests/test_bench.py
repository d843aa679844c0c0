"""bench/bench.py --smoke: the CPU form of the benchmark, run as a user runs it."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench import LADDER  # noqa: E402


@pytest.mark.slow
def test_bench_smoke_separates_each_gain_and_names_the_machine(tmp_path, cifar_dir, weights_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--smoke",
            "--device",
            "cpu",
            "--data-dir",
            str(cifar_dir.parent),
            "--weights",
            str(weights_path),
            "--json",
            str(tmp_path / "bench.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["environment"]["cpu"]["model"] and result["environment"]["cpu"]["cores"] >= 1
    assert result["environment"]["cpu"]["bf16_units"] in ("AMX", "AVX-512 BF16", "none")
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in result["throughput"])

    rows = result["gains"]
    assert [r["step"] for r in rows] == [label for label, _, _ in LADDER]
    for before, row in itertools.pairwise(rows):
        assert row["gain"] == pytest.approx(before["seconds"] / row["seconds"])
        assert row["vs_plain"] == pytest.approx(rows[0]["seconds"] / row["seconds"])
    # the plain loop and ours in fp32, cached or not, train the same mathematics: the same test accuracy
    assert rows[1]["test_accuracy"] == pytest.approx(rows[0]["test_accuracy"], abs=0.01)
    assert rows[2]["test_accuracy"] == pytest.approx(rows[0]["test_accuracy"], abs=0.01)
    for row in rows:
        assert f"{row['step']:<48} {row['seconds']:>8.1f}" in done.stdout
    assert "median of 5" in done.stdout and result["presets"][0]["test_accuracy"] > 0
