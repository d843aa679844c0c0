"""The second hardening pass: one run folder per run, images that decode wrong or not at all, and
one line instead of a traceback for each foreseeable mistake.

Each test failed before its fix.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cifar_transfer.data.images import ImageError, read_image
from cifar_transfer.runfolder import LOCK, FolderInUse, clear_run, run_folder

UNSAFE_ADVICE = re.compile(
    r"weights_only.{0,20}False|arbitrary code|Re-running|trusted source", re.I | re.S
)


def one_line(done: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> str:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr, done.stderr
    lines = [
        line
        for line in done.stderr.strip().splitlines()
        if line.startswith("error:") or status == 1
    ]
    text = lines[-1] if lines else done.stderr
    for f in fragments:
        assert f in text, (f, done.stderr)
    return text


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---- 1. one run folder, one run ----


def test_a_folder_in_use_is_refused_and_released_when_its_holder_is_killed(tmp_path, run_cli):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time\nfrom cifar_transfer.runfolder import run_folder\nwith "
            "run_folder(pathlib.Path(sys.argv[1])):\n print('held', flush=True); time.sleep(600)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    done = run_cli("run", "--preset", "smoke", "--out", str(folder))
    one_line(done, f"{folder}: in use by another run (pid {holder.pid})")
    assert not (folder / "error.txt").exists()  # the live run's folder is left as it is
    holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, nothing stale is left
    holder.wait()
    with run_folder(folder):
        assert (folder / LOCK).read_text() == f"pid {os.getpid()}"


def test_a_finished_run_is_not_overwritten_silently(smoke_copy, run_cli):
    before = (smoke_copy / "metrics.json").read_bytes()
    done = run_cli("run", "--preset", "smoke", "--out", str(smoke_copy))
    one_line(done, f"{smoke_copy}: holds a finished run", "--overwrite")
    assert (smoke_copy / "metrics.json").read_bytes() == before and not (
        smoke_copy / "error.txt"
    ).exists()


def test_an_interrupted_run_points_at_resume_and_overwrite_starts_clean(tmp_path, run_cli):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"x")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")
    one_line(
        run_cli("run", "--preset", "smoke", "--out", str(folder)), f"--resume {folder} continues it"
    )
    with pytest.raises(FolderInUse), run_folder(folder):
        pass
    with run_folder(folder, overwrite=True):
        clear_run(folder)
        assert [p.name for p in folder.iterdir()] == [LOCK]
    done = run_cli("run", "--resume", str(folder), "--overwrite")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


# ---- 2-4. images ----


def corrupt_avif() -> bytes:
    """A valid AVIF with one byte flipped where Pillow's AVIF decoder raises something other than
    OSError."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "AVIF"
    )
    data = buf.getvalue()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        try:
            Image.open(io.BytesIO(bytes(bad))).load()
        except (OSError, SyntaxError, ValueError):
            continue
        except Exception:
            return bytes(bad)
    pytest.fail(
        "no byte flip makes Pillow's AVIF decoder raise outside OSError/SyntaxError/ValueError"
    )


def test_any_decoder_failure_is_a_bad_image(smoke_run, cifar, tmp_path, run_cli):
    bad = tmp_path / "bad.avif"
    bad.write_bytes(corrupt_avif())
    with pytest.raises(ImageError, match=r"bad\.avif: truncated or corrupt image"):
        read_image(bad.read_bytes(), str(bad))
    good = tmp_path / "good.png"
    good.write_bytes(png(cifar[1].images[0]))
    done = run_cli("predict", str(smoke_run), str(good), str(bad))
    assert done.returncode == 1 and done.stdout.count("good.png: ") == 1
    assert (
        done.stderr.startswith(f"error: {bad}: truncated or corrupt image")
        and "Traceback" not in done.stderr
    )


def test_high_bit_depth_is_scaled_as_its_8_bit_file_and_float_is_refused():
    picture = np.random.default_rng(1).integers(0, 256, (48, 40), dtype=np.uint8)
    sixteen = io.BytesIO()
    Image.fromarray(picture.astype(np.uint16) * 257).save(sixteen, "PNG")  # 16-bit greyscale
    assert np.array_equal(read_image(sixteen.getvalue()), read_image(png(picture)))
    floating = io.BytesIO()
    Image.fromarray(picture.astype(np.float32) / 255).save(floating, "TIFF")
    with pytest.raises(ImageError, match=r"f\.tif: floating-point pixels"):
        read_image(floating.getvalue(), "f.tif")


def test_predict_reads_only_regular_files(smoke_run, cifar, tmp_path, run_cli):
    good = tmp_path / "good.png"
    good.write_bytes(png(cifar[1].images[0]))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    done = run_cli("predict", str(smoke_run), str(fifo), "/dev/zero", str(good))
    assert time.monotonic() - started < 60  # a FIFO with no writer used to hang forever
    assert done.returncode == 1 and "good.png: " in done.stdout
    assert f"error: {fifo}: a FIFO, not an image file" in done.stderr
    assert (
        "error: /dev/zero: not a regular file" in done.stderr and "MemoryError" not in done.stderr
    )


def test_evaluate_names_everything_it_skips(smoke_copy, cifar, tmp_path, run_cli):
    photos = tmp_path / "photos"
    (photos / "cat").mkdir(parents=True)
    (photos / "cat" / "a.png").write_bytes(png(cifar[1].images[3]))
    (photos / "cat" / "broken").symlink_to(tmp_path / "nowhere.png")
    (photos / "cat" / "loop").symlink_to(photos / "cat" / "loop")
    os.mkfifo(photos / "cat" / "pipe")
    (photos / "cat" / "linked").symlink_to(photos)  # a folder link: not followed, so no cycle
    done = run_cli("evaluate", str(smoke_copy), "--data", str(photos))
    assert done.returncode == 0, done.stderr
    skipped = done.stderr
    assert (
        f"skipped: {photos / 'cat' / 'broken'}: cannot be read (No such file or directory)"
        in skipped
    )
    assert f"skipped: {photos / 'cat' / 'loop'}: a symbolic link loop" in skipped
    assert f"skipped: {photos / 'cat' / 'pipe'}: a FIFO, not an image file" in skipped
    assert (
        f"skipped: {photos / 'cat' / 'linked'}: a symbolic link to a folder, not followed"
        in skipped
    )
    assert "on 1 images (4 skipped)" in done.stdout


# root reads folders whatever their mode: as root, the command runs without the two capabilities
# that allow it
AS_A_USER = [
    "setpriv",
    *(f"--{s}=-dac_override,-dac_read_search" for s in ("bounding-set", "inh-caps")),
]


def test_an_unreadable_photo_folder_is_named_as_itself(smoke_copy, tmp_path):
    photos = tmp_path / "photos"
    (photos / "cat").mkdir(parents=True)
    photos.chmod(0)
    command = [
        sys.executable,
        "-m",
        "cifar_transfer",
        "evaluate",
        str(smoke_copy),
        "--data",
        str(photos),
    ]
    try:
        done = subprocess.run(
            [*AS_A_USER, *command] if os.geteuid() == 0 else command, capture_output=True, text=True
        )
        one_line(done, f"{photos}: a folder that cannot be read")
    finally:
        photos.chmod(0o755)


# ---- 8-12. one line, not a traceback ----


@pytest.mark.parametrize(
    "argv",
    [
        ["repeat", "--preset", "smoke", "--seeds", "0"],
        ["repeat", "--preset", "smoke", "--seeds", "-2"],
        ["run", "--device", "bogus"],
        ["evaluate", "RUN", "--device", "bogus"],
        ["serve", "RUN", "--device", "bogus"],
        ["serve", "RUN", "--port", "70000"],
        ["serve", "RUN", "--max-bytes", "-1"],
        ["serve", "RUN", "--max-images", "0"],
    ],
)
def test_bad_options_are_usage_errors_before_anything_starts(argv, run_cli, tmp_path):
    done = run_cli(*[str(tmp_path) if a == "RUN" else a for a in argv])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(r"argument --\S+: '[^']*': must be", done.stderr), done.stderr


def test_service_limits_that_refuse_everything_are_refused_at_start(smoke_run):
    from cifar_transfer.serving.service import ServiceError, create_app

    with pytest.raises(ServiceError, match="--max-images 0: must be at least 1"):
        create_app(smoke_run, max_images=0)


def test_compare_says_what_tune_trials_lack(smoke_run, tmp_path, run_cli):
    trials = []
    for k in range(2):  # what a tune trial holds: its metrics have no test evaluation
        trial = tmp_path / f"trial-000{k}"
        trial.mkdir()
        for name in ("recipe.json", "history.csv"):
            (trial / name).write_bytes((smoke_run / name).read_bytes())
        metrics = json.loads((smoke_run / "metrics.json").read_text())
        (trial / "metrics.json").write_text(
            json.dumps({"run": metrics["run"], "timings": metrics["timings"]})
        )
        trials.append(str(trial))
    done = run_cli("compare", *trials, "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    assert "best validation accuracy" in done.stdout
    assert done.stderr.count("lacks a test evaluation") == 2
    assert "| lacks |" in (tmp_path / "cmp" / "report.md").read_text()


def test_export_checks_its_target_first(smoke_run, tmp_path, run_cli):
    one_line(
        run_cli("export", str(smoke_run), "--onnx", str(tmp_path)),
        f"{tmp_path}: a folder; --onnx takes a file",
    )
    (tmp_path / "f").write_text("x")
    started = time.monotonic()
    one_line(
        run_cli("export", str(smoke_run), "--onnx", str(tmp_path / "f" / "x.onnx")),
        "f: a file, not a folder",
    )
    assert time.monotonic() - started < 10  # refused before the export, not after


@pytest.mark.parametrize("command", ["compare", "lr-find"])
def test_compare_and_lr_find_check_their_output_folder_first(command, smoke_run, tmp_path, run_cli):
    (tmp_path / "f").write_text("x")
    target = str(tmp_path / "f" / "out")
    args = [str(smoke_run), str(smoke_run)] if command == "compare" else ["--preset", "smoke"]
    started = time.monotonic()
    one_line(run_cli(command, *args, "--out", target), f"{target}: output folder is not writable")
    assert time.monotonic() - started < 10  # before reading data or training a step


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("recipe", None, "metadata has no 'recipe'"),
        ("stride_in_1x1", None, "metadata has no 'stride_in_1x1'"),
        ("recipe", "{not json", "metadata 'recipe' is not valid JSON"),
        ("recipe", "[1, 2]", "metadata 'recipe' must be a JSON dict, got list"),
    ],
)
def test_a_tampered_model_file_is_one_line(smoke_run, tmp_path, run_cli, key, value, fragment):
    from safetensors import safe_open

    with safe_open(smoke_run / "model.safetensors", "pt") as f:
        meta = dict(f.metadata())
    meta.pop(key) if value is None else meta.__setitem__(key, value)
    (tmp_path / "run").mkdir()
    save_file(
        load_file(smoke_run / "model.safetensors"),
        tmp_path / "run" / "model.safetensors",
        metadata=meta,
    )
    one_line(run_cli("evaluate", str(tmp_path / "run")), fragment)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"head_hidden": 128}', "head_hidden=128: must be a list of integers"),
        ('{"head_hidden": null}', "head_hidden=None: must be a list of integers"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_recipe_files_are_one_line(tmp_path, run_cli, content, fragment):
    (tmp_path / "r.json").write_text(content)
    one_line(
        run_cli("run", "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "run")),
        "r.json",
        fragment,
    )


def test_widths_that_would_not_fit_in_memory_are_refused_up_front(tmp_path, run_cli):
    done = run_cli(
        "run", "--preset", "smoke", "--set", "head_hidden=1000000000", "--out", str(tmp_path / "r")
    )
    one_line(done, "head_hidden=(1000000000,): at most 16 layers, each 1 to 65,536 wide")


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_pickle_with_a_blocked_global_never_prints_torchs_unsafe_advice(
    tmp_path, run_cli, cifar_dir
):
    torch.save({"state": Evil()}, tmp_path / "w.pth")
    weights = run_cli(
        "run",
        "--preset",
        "smoke",
        "--weights",
        str(tmp_path / "w.pth"),
        "--out",
        str(tmp_path / "a"),
    )
    text = one_line(weights, "w.pth: not a plain state_dict", "posix.system")
    run = tmp_path / "b"
    run.mkdir()
    torch.save({"recipe": Evil()}, run / "checkpoint.pt")
    checkpoint = one_line(
        run_cli("run", "--resume", str(run)), "not a readable checkpoint", "posix.system"
    )
    for line in (text, checkpoint):
        assert not UNSAFE_ADVICE.search(line), line


def test_predict_says_once_whether_its_probabilities_are_calibrated(
    smoke_run, cifar, tmp_path, run_cli
):
    from cifar_transfer.serving.predictor import Predictor

    files = []
    for k in range(2):
        files.append(tmp_path / f"{k}.png")
        files[-1].write_bytes(png(cifar[1].images[k]))
    done = run_cli("predict", str(smoke_run), *map(str, files))
    temperature = Predictor(smoke_run).temperature
    assert done.stdout.splitlines()[0] == f"probabilities calibrated (T = {temperature:.3g}):"
    assert done.stdout.count("calibrated") == 1
    raw = run_cli("predict", str(smoke_run), str(files[0]), "--no-calibration")
    assert raw.stdout.splitlines()[0] == "probabilities not calibrated:"
