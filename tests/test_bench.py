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
    # the plain loop and ours in fp32, cached or not, train the same mathematics: the same test
    # accuracy
    assert rows[1]["test_accuracy"] == pytest.approx(rows[0]["test_accuracy"], abs=0.01)
    assert rows[2]["test_accuracy"] == pytest.approx(rows[0]["test_accuracy"], abs=0.01)
    for row in rows:
        assert f"{row['step']:<48} {row['seconds']:>8.1f}" in done.stdout
    assert "median of 5" in done.stdout and result["presets"][0]["test_accuracy"] > 0
    assert result["machine"]["bf16_matmul"] > 0 and "roofline (TFLOP/s): fp32 matmul" in done.stdout


def test_roofline_reads_each_pass_of_a_run_against_the_machine(smoke_run, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import roofline

    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "roofline.py"),
            str(smoke_run),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    (run,) = result["runs"]
    by_pass = {p["pass"].split(":")[0].split(" (")[0]: p for p in run["passes"]}
    assert by_pass["phase 2"]["seconds"] == metrics["timings"]["phase2_s"]
    # the test evaluation is 10,000 forwards of the whole network: FLOPs counted per image, times
    # the images
    recipe = roofline.Recipe.from_dict(json.loads((smoke_run / "recipe.json").read_text()))
    full_forward = roofline.flops_per_image(recipe)["full_forward"]
    # ResNet-50: 4.1 G multiply-adds at 224 px
    assert full_forward == pytest.approx(2 * 4.1e9 * (32 / 224) ** 2, rel=0.1)
    assert by_pass["test evaluation"]["tflop"] == pytest.approx(10_000 * full_forward / 1e12)
    assert by_pass["test evaluation"]["tflop_s"] == pytest.approx(
        by_pass["test evaluation"]["tflop"] / metrics["timings"]["eval_s"]
    )
    assert result["environment"]["cpu"]["model"] in done.stdout
    # smoke computes in fp32: its passes are read against the fp32 rate, not bf16's (emulated on
    # some CPUs)
    assert (
        run["computed_in"] == metrics["run"]["computed_in"] == "fp32"
        and "of fp32 mm" in done.stdout
    )
