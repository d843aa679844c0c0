"""Test-time adaptation (model.adapt) on a saved CIFAR-10 run: what it costs, and how many images
and how strong a prior it needs. Behind model.adapt.PRIOR and the --adapt numbers in
docs/robustness.md.

    python bench/design/adapt.py cost RUN    # Predictor.adapt on 64 images against one prediction
                                             # pass over them; the moments `run` saves
    python bench/design/adapt.py prior RUN   # accuracy on 500 test images of a corruption after
                                             # adapting on n others of it, for several priors

`prior` is inductive: the images adapted on and the images scored are different test images (the
transductive number, adapting on the scored images themselves, is `cifar-transfer robustness RUN
--adapt`). Run `cost` alone on the machine. Corruptions are drawn by the tool (data.corruptions) at
CIFAR-10-C's strength.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from cifar_transfer.data import corruptions
from cifar_transfer.data.cifar import load_cifar10
from cifar_transfer.data.sources import load_splits
from cifar_transfer.machine import environment
from cifar_transfer.model.adapt import adapted, training_moments
from cifar_transfer.model.inference import logits_for
from cifar_transfer.model.network import for_inference, load_model, place
from cifar_transfer.serving.predictor import Predictor

CELLS = [("clean", 0), ("impulse_noise", 5), ("glass_blur", 3), ("fog", 5)]


def cost(run: Path, repeats: int = 5) -> None:
    train, test = load_cifar10(os.environ.get("CIFAR_TRANSFER_DATA"), allow_download=False)
    images = test.images[:64]
    model, recipe = load_model(run / "model.safetensors")
    t0 = time.perf_counter()
    moments = training_moments(place(model, recipe, torch.device("cpu")), train.images, recipe)
    print(f"what `run` adds: the training images' moments in {time.perf_counter() - t0:.1f} s")
    predictor = Predictor(run)
    predictor.network.source_moments = predictor.network.source_moments or moments  # older models
    predictor.probabilities(images), predictor.adapt(images)  # warm-up: allocator, kernels
    predict_s, adapt_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.probabilities(images)
        predict_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        predictor.adapt(images)
        adapt_s.append(time.perf_counter() - t0)
    print(environment(predictor.device)["device_name"], f"torch threads {torch.get_num_threads()}")
    print(
        f"64 images, median of {repeats}: one prediction pass {np.median(predict_s):.2f} s; "
        f"adapt {np.median(adapt_s):.2f} s"
    )


def prior(run: Path, ns: list[int], priors: list[float], scored: int = 500) -> None:
    model, recipe = load_model(run / "model.safetensors")
    splits = load_splits(
        recipe, None, os.environ.get("CIFAR_TRANSFER_DATA"), False, progress=False
    ).splits
    network = place(model, recipe, torch.device("cpu"))
    moments = model.source_moments or training_moments(network, splits.train.images, recipe)
    order = np.random.default_rng(0).permutation(len(splits.test))
    score, pool = order[:scored], order[scored:]
    standard = for_inference(model, recipe, torch.device("cpu"))
    print(
        f"{run}: {scored} scored test images; adapted on n other test images of the same corruption"
    )
    print("cell | standard | " + " | ".join(f"n={n} p={p:g}" for n in ns for p in priors))
    for name, severity in CELLS:
        images = splits.test.images
        if name != "clean":
            images = corruptions.corrupt(images[order[: scored + max(ns)]], name, severity, seed=0)
            score_x, pool_x = images[:scored], images[scored:]
        else:
            score_x, pool_x = images[score], images[pool[: max(ns)]]
        labels = splits.test.labels[score]
        row = [f"{name} s{severity}", f"{_accuracy(standard, score_x, labels, recipe):.3f}"]
        for n in ns:
            for p in priors:
                net = for_inference(
                    adapted(network, pool_x[:n], recipe, moments, p), recipe, torch.device("cpu")
                )
                row.append(f"{_accuracy(net, score_x, labels, recipe):.3f}")
        print(" | ".join(row), flush=True)


def _accuracy(model, images, labels, recipe) -> float:
    return float((logits_for(model, images, recipe).argmax(1) == labels).mean())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["cost", "prior"])
    p.add_argument("run", type=Path)
    p.add_argument("--n", default="8,32,128", help="adaptation images (prior)")
    p.add_argument("--priors", default="0,16,64", help="source pseudo-images (prior)")
    a = p.parse_args()
    if a.what == "cost":
        cost(a.run)
    else:
        prior(a.run, [int(n) for n in a.n.split(",")], [float(x) for x in a.priors.split(",")])


if __name__ == "__main__":
    main()
