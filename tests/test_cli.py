"""End to end: the `smoke` preset on the real data and weights, through the installed command."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifar_transfer.data import sources
from cifar_transfer.data.cifar import CLASSES, Dataset
from cifar_transfer.jobs import run as run_job
from cifar_transfer.model.network import load_model, place
from cifar_transfer.recipe import Recipe, preset
from cifar_transfer.reporting import report
from cifar_transfer.reporting.report import pct

OUTPUTS = {
    ".lock",  # the run folder's lock (runfolder.py): kept, so a later run can take it safely
    "recipe.json",
    "history.csv",
    "metrics.json",
    "classification_report.txt",
    "samples.png",
    "class_counts.png",
    "learning_curves.png",
    "confusion_matrix.png",
    "misclassified.png",
    "model.safetensors",
    "test_logits.npy",
    "report.md",
    "report.html",
    "reliability.png",
    "human_vs_model.png",
    "clear_errors.png",
    "gradcam.png",
    "robustness.png",
}


def test_a_run_writes_every_output_and_nothing_half_done(smoke_run):
    names = {
        p.name for p in smoke_run.iterdir() if p.is_file()
    }  # other tests add analysis/, evaluations/
    assert names == OUTPUTS  # no checkpoint, temporary file or error.txt left behind
    assert Recipe.from_dict(json.loads((smoke_run / "recipe.json").read_text())) == preset("smoke")
    history = (smoke_run / "history.csv").read_text().splitlines()
    assert history[0].startswith("phase,epoch") and len(history) == 3


def test_metrics_cover_the_whole_test_set(smoke_run):
    m = json.loads((smoke_run / "metrics.json").read_text())
    t = m["test"]
    assert t["n"] == 10_000 and np.array(t["confusion"]).sum() == 10_000
    assert t["accuracy"] == pytest.approx(np.trace(np.array(t["confusion"])) / 10_000)
    assert 0.2 < t["accuracy"] < 1  # far above chance after one epoch on the real weights
    assert (
        m["data"]["counts"]["train"] == [50] * 10 and m["data"]["counts"]["validation"] == [50] * 10
    )
    assert m["run"]["versions"]["torch"] == torch.__version__
    assert {r["a"] for r in t["leakage"]} == {"cat", "automobile", "bird", "deer"}
    # the logits `audit` and `analyze` read back are the ones these metrics came from
    predicted = np.load(smoke_run / "test_logits.npy").argmax(1)
    assert np.bincount(predicted, minlength=10).tolist() == np.array(t["confusion"]).sum(0).tolist()


def test_reports_show_the_numbers_in_metrics(smoke_run):
    m = json.loads((smoke_run / "metrics.json").read_text())
    t = m["test"]
    md = (smoke_run / "report.md").read_text()
    html = (smoke_run / "report.html").read_text()
    expected = [
        pct(t["accuracy"]),
        f"{t['loss']:.4f}",
        f"{t['macro_f1']:.4f}",
        *(f"{t['per_class'][c]['f1']:.4f}" for c in CLASSES),
        *(pct(r["a_as_b"]) for r in t["leakage"]),
        *(pct(r["b_as_a"]) for r in t["leakage"]),
        f"{m['final_epoch']['val_acc']:.4f}",
        t["misclassified"][0]["predicted"],
    ]
    for text in expected:
        assert text in md, text
        assert text in html, text
    # self-contained
    assert "<img" in html and 'src="data:image/png;base64,' in html and '.png"' not in html
    for section in (
        "What this run found",
        "Per-class precision",
        "Confusion matrix",
        "Class leakage",
        "Misclassified",
        "Learning curves",
        "Reproduce",
    ):
        assert section in md
    # results first, then how the run was made, the recipe's table last
    order = [
        "What this run found",
        "# Test set",
        "## Calibration",
        "# Error analysis",
        "# Appendix",
        "## Data",
    ]
    order += ["## Training", "## Reproduce", "## Recipe"]
    places = [md.index(f"{heading}") for heading in order]
    assert places == sorted(places) and md.count("\n## ", places[-1]) == 0


@pytest.mark.slow
def test_evaluate_reproduces_the_test_accuracy(smoke_copy, cifar_dir, run_cli, monkeypatch):
    monkeypatch.setenv("CIFAR_TRANSFER_DATA", str(cifar_dir.parent))
    done = run_cli("evaluate", str(smoke_copy), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    again = json.loads((smoke_copy / "evaluations" / "cifar10-test" / "metrics.json").read_text())
    first = json.loads((smoke_copy / "metrics.json").read_text())
    assert again["test"]["confusion"] == first["test"]["confusion"]


def test_evaluate_on_an_npz(smoke_copy, cifar, tmp_path, run_cli):
    _, test = cifar
    idx = np.arange(0, 10_000, 20)
    np.savez(tmp_path / "subset.npz", images=test.images[idx], labels=test.labels[idx])
    done = run_cli("evaluate", str(smoke_copy), "--data", str(tmp_path / "subset.npz"))
    assert done.returncode == 0, done.stderr
    result = json.loads((smoke_copy / "evaluations" / "subset" / "metrics.json").read_text())[
        "test"
    ]
    model, recipe = load_model(smoke_copy / "model.safetensors")
    model = place(model, recipe, torch.device("cpu"))  # the same memory layout as `evaluate` uses
    with torch.no_grad():
        pred = (
            model(torch.from_numpy(test.images[idx]).permute(0, 3, 1, 2).float() / 255)
            .argmax(1)
            .numpy()
        )
    assert result["n"] == len(idx)
    assert result["accuracy"] == pytest.approx((pred == test.labels[idx]).mean())


# What a user looks for in each command's help: its arguments and where its defaults come from
HELP = {
    (): [
        *(
            "run",
            "analyze",
            "audit",
            "repeat",
            "eda",
            "evaluate",
            "lr-find",
            "tune",
            "compare",
            "predict",
        ),
        *("serve", "export"),
    ],
    ("run",): [
        "--preset",
        "--recipe",
        "--set",
        "--data-dir",
        "--weights",
        "--out",
        "--resume",
        "CIFAR_TRANSFER_DATA",
        "CIFAR_TRANSFER_WEIGHTS",
    ],
    ("eda",): ["--out", "runs/eda", "--data-dir", "--preset", "--no-download"],
    ("evaluate",): ["RUN_DIR", "--data", "--tta", "--device", ".npz"],
    ("audit",): ["RUN_DIR", "--data", "--resolution", "--exclude", "label_issues.csv"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_answers_at_once_with_each_commands_options(command):
    """--help exits 0 with the command's options, before torch is imported (so it answers in a
    fraction of a second)."""
    probe = (
        "import sys; from cifar_transfer.cli import main\ntry:\n    main([*sys.argv[1:], "
        "'--help'])\nexcept SystemExit as e:\n    print('torch imported' if 'torch' in "
        "sys.modules else 'light', e.code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip().endswith("light 0"), done.stdout + done.stderr
    for option in HELP[command]:
        assert option in done.stdout, option


def test_eda_writes_its_figures(cifar_dir, tmp_path, run_cli):
    done = run_cli(
        "eda", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "eda"), "--preset", "smoke"
    )
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "eda").iterdir()} == {"samples.png", "class_counts.png"}


def test_a_bad_override_is_one_clear_line(tmp_path, run_cli):
    done = run_cli("run", "--set", "finetune_epochs=many", "--out", str(tmp_path / "r"))
    assert done.returncode == 1
    assert done.stderr.strip() == "error: --set finetune_epochs='many': not a valid int"


def test_the_report_opens_with_the_claim_and_names_the_shipped_epoch(smoke_run):
    m = json.loads((smoke_run / "metrics.json").read_text())
    first = (smoke_run / "report.md").read_text().split("\n\n")[1]
    assert pct(m["test"]["accuracy"]) in first and pct(report.CLAIM) in first
    # the claim's recipe, named; no accuracy this run did not measure
    assert "preset `seed`" in first
    measured = {pct(m["test"]["accuracy"]), pct(report.CLAIM)}
    assert set(re.findall(r"\d+\.\d\d%", first)) <= measured, first
    # smoke keeps the last epoch; the history marks it as the one shipped
    assert m["shipped"]["keep"] == "last" and m["shipped"]["epoch"] == m["final_epoch"]["epoch"]
    assert (smoke_run / "history.csv").read_text().splitlines()[-1].endswith(",True")
    assert f"epoch {m['shipped']['epoch']} (phase 2" in (smoke_run / "report.md").read_text()
    assert m["run"]["cpu"]["model"] and m["run"]["cpu"]["model"] in m["run"]["device_name"]


@pytest.mark.parametrize(("cuda", "chosen"), [(False, "lean"), (True, "strong")])
def test_auto_runs_the_preset_that_reaches_the_claim_on_this_machine(
    cuda, chosen, run_cli, monkeypatch, tmp_path
):
    """`run` (--preset auto) trains lean without CUDA and strong with it, and the run records
    why."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        run_job, "run", lambda recipe, out, **kw: calls.append((recipe, kw["chosen_by"]))
    )
    assert run_cli("run", "--out", str(tmp_path / "r")).returncode == 0
    ((recipe, why),) = calls
    assert recipe == preset(chosen)
    assert why == f"--preset auto on {'a CUDA device' if cuda else 'a machine without CUDA'}"
    calls.clear()
    run_cli("run", "--preset", "seed", "--out", str(tmp_path / "s"))
    assert calls == [(preset("seed"), None)]


@pytest.mark.slow
def test_the_shipped_model_does_not_depend_on_test_labels(
    cifar, weights_path, tmp_path, monkeypatch
):
    """Training and best_val selection never read test labels: shuffling them changes only the test
    score."""
    train_set, test = cifar
    r = preset("lean").with_overrides(
        [
            "resolution=32",
            "train_size=60",
            "val_size=40",
            "batch_size=16",
            "head_epochs=2",
            "finetune_epochs=2",
            "finetune_from=layer4",
            "analysis=false",
            "eval_batch_size=100",
            "precision=fp32",
        ]
    )
    sub = test.take(np.arange(200))
    shuffled = Dataset(sub.images, np.random.default_rng(1).permutation(sub.labels), sub.source)
    results = []
    for t in (sub, shuffled):
        monkeypatch.setattr(sources, "load_cifar10", lambda *a, t=t, **k: (train_set, t))
        out = tmp_path / f"run{len(results)}"
        m = run_job.run(r, out, weights=str(weights_path), progress=False)
        results.append((m, load_file(out / "model.safetensors")))
    (a, wa), (b, wb) = results
    assert a["shipped"] == b["shipped"] and a["shipped"]["keep"] == "best_val"
    assert a["final_epoch"]["val_acc"] == b["final_epoch"]["val_acc"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["test"]["confusion"] != b["test"]["confusion"]


def test_tensorboard_holds_every_step_and_epoch(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(smoke_run / "tensorboard"))
    events.Reload()
    history = pipeline_history(smoke_run)
    r = preset("smoke")
    per_epoch = -(-r.train_size // r.batch_size)
    losses, lrs = events.Scalars("step/train_loss"), events.Scalars("step/learning_rate")
    assert [e.step for e in losses] == list(range(per_epoch * len(history)))
    sizes = [r.batch_size] * (per_epoch - 1) + [r.train_size - r.batch_size * (per_epoch - 1)]
    for k, row in enumerate(history):  # each epoch's steps average to the epoch's training loss
        values = [e.value for e in losses[k * per_epoch : (k + 1) * per_epoch]]
        assert sum(v * s for v, s in zip(values, sizes)) / r.train_size == pytest.approx(
            row["train_loss"], rel=1e-5
        )
    assert all(e.value == pytest.approx(r.head_lr) for e in lrs[:per_epoch])
    assert all(e.value == pytest.approx(r.finetune_lr) for e in lrs[per_epoch:])
    assert [e.value for e in events.Scalars("epoch/val_acc")] == pytest.approx(
        [h["val_acc"] for h in history]
    )


def pipeline_history(run: Path) -> list[dict]:
    with (run / "history.csv").open() as f:
        return [
            {k: float(v) if k != "shipped" else v for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


@pytest.mark.parametrize(
    ("argv", "hidden", "group"),
    [
        (["serve", "RUN"], "fastapi", "serve"),
        (["export", "RUN", "--onnx", "m.onnx"], "onnxruntime", "export"),
        (["tune", "--preset", "smoke", "--trials", "1"], "optuna", "tune"),
    ],
)
def test_a_missing_optional_group_is_named_with_its_pip_command(
    argv, hidden, group, run_cli, monkeypatch, tmp_path
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == hidden else find_spec(name, *a),
    )
    result = run_cli(*[str(tmp_path) if a == "RUN" else a for a in argv], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.strip()
        == f"error: {hidden} not installed: pip install 'cifar-transfer[{group}]'"
    )
