"""What several jobs share: the machine they run on (CPU model, bf16 units, peak memory, library
versions) and their default paths."""

from __future__ import annotations

import os
import platform
import resource
import shlex
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import sklearn
import torch
import torchvision


def cpu_model() -> dict:
    """The CPU's model name, cores and bf16 matrix units: CPU figures differ 2x between machines of
    one kind."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    bf16 = "none"
    if "amx_bf16" in flags:
        bf16 = "AMX"
    elif "avx512_bf16" in flags:
        bf16 = "AVX-512 BF16"
    return {
        "model": fields.get("model name", platform.processor() or platform.machine()),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "bf16_units": bf16,
    }


def command_line() -> str:
    """The command this process runs, as a user would type it again (recorded in every
    metrics.json)."""
    return shlex.join(["cifar-transfer", *sys.argv[1:]])


def peak_rss_gib() -> float:
    """The most memory this process has held (resident set), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports kilobytes


def environment(device: torch.device) -> dict:
    """The device, CPU, GPU and library versions a result was measured with."""
    cpu = cpu_model()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu = {
            "name": name,
            "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
        }
    else:
        name, gpu = (
            f"CPU: {cpu['model']} ({cpu['threads']} threads, bf16 units: {cpu['bf16_units']})",
            None,
        )
    return {
        "device": str(device),
        "device_name": name,
        "cpu": cpu,
        "gpu": gpu,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
    }


def default_run_dir(name: str) -> Path:
    """runs/<name>-<date>-<time>."""
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def default_weights() -> str:
    return os.environ.get("CIFAR_TRANSFER_WEIGHTS", "imagenet")
