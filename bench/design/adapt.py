"""Test-time adaptation (model.adapt) on a saved CIFAR-10 run: what it costs, and how many images
and how strong a prior it needs. Behind model.adapt.PRIOR and the --adapt numbers in
docs/robustness.md.

    python bench/design/adapt.py cost RUN    # Predictor.adapt on 64 images against one prediction
                                             # pass over them; the moments `run` saves
    python bench/design/adapt.py prior RUN   # accuracy on 500 test images of a corruption after
                                             # adapting on n others of it, for several priors
    python bench/design/adapt.py tent RUN    # does TENT's entropy step pay on top of the moment
                                             # map? transductive, as `robustness --adapt`; the
                                             # images sorted by class, as a folder gives them

`prior` is inductive: the images adapted on and the images scored are different test images (the
transductive number, adapting on the scored images themselves, is `cifar-transfer robustness RUN
--adapt`). Run `cost` alone on the machine. Corruptions are drawn by the tool (data.corruptions) at
CIFAR-10-C's strength.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from cifar_transfer.data import corruptions
from cifar_transfer.data.augment import to_input, to_nchw
from cifar_transfer.data.cifar import load_cifar10
from cifar_transfer.data.sources import load_splits
from cifar_transfer.machine import environment
from cifar_transfer.model.adapt import adapted, batchnorms, training_moments
from cifar_transfer.model.inference import autocast, logits_for
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


TENT_CELLS = [
    ("clean", 0),
    ("gaussian_noise", 5),
    ("impulse_noise", 5),
    ("glass_blur", 3),
    ("glass_blur", 5),
    ("elastic_transform", 5),
    ("jpeg_compression", 5),
    ("fog", 5),
]


def tent(run: Path, lrs: list[float], epochs: int, scored: int = 1000) -> None:
    """Accuracy on `scored` class-balanced test images of each cell: standard, adapted by the moment
    map (model.adapt) on those images, and then TENT's step (Wang et al., ICLR 2021: the BatchNorm
    layers' scale and shift moved by Adam to lower the entropy of the predictions on those images,
    in batches of 64, the statistics held at the mapped ones) for each learning rate."""
    model, recipe = load_model(run / "model.safetensors")
    splits = load_splits(
        recipe, None, os.environ.get("CIFAR_TRANSFER_DATA"), False, progress=False
    ).splits
    cpu = torch.device("cpu")
    network = place(model, recipe, cpu)
    moments = model.source_moments or training_moments(network, splits.train.images, recipe)
    per_class = scored // len(splits.test.classes)
    pick = np.concatenate(
        [np.flatnonzero(splits.test.labels == c)[:per_class] for c in range(len(model.classes))]
    )
    labels = splits.test.labels[pick]
    standard = for_inference(model, recipe, cpu)
    print(f"{run}: {len(pick)} test images, each cell adapted on its own images (transductive)")
    print("cell | standard | moment map | " + " | ".join(f"+ TENT lr {lr:g}" for lr in lrs))
    for name, severity in TENT_CELLS:
        images = splits.test.images[pick]
        if name != "clean":
            images = corruptions.corrupt(images, name, severity, seed=0)
        mapped = adapted(network, images, recipe, moments)
        row = [f"{name} s{severity}", _accuracy(standard, images, labels, recipe)]
        row.append(_accuracy(for_inference(mapped, recipe, cpu), images, labels, recipe))
        for lr in lrs:
            t0 = time.perf_counter()
            tuned = entropy_tuned(mapped, images, recipe, lr, epochs)
            row.append(_accuracy(for_inference(tuned, recipe, cpu), images, labels, recipe))
            seconds = time.perf_counter() - t0
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else v for v in row), flush=True)
    print(f"one TENT adaptation, {epochs} epoch(s) over {len(pick)} images: {seconds:.1f} s")


def entropy_tuned(model, images, recipe, lr: float, epochs: int, batch: int = 64):
    """A copy of `model` whose BatchNorm scales and shifts Adam has moved to lower the mean entropy
    of its predictions on `images` (its statistics unchanged)."""
    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    params = [p for bn in batchnorms(model).values() for p in (bn.weight, bn.bias)]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    x = to_nchw(images)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(batch):
            with autocast(x.device, recipe.precision):
                logits = model(to_input(x[idx]))
            log_p = logits.float().log_softmax(1)
            loss = -(log_p.exp() * log_p).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.requires_grad_(False)


def _accuracy(model, images, labels, recipe) -> float:
    return float((logits_for(model, images, recipe).argmax(1) == labels).mean())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["cost", "prior", "tent"])
    p.add_argument("run", type=Path)
    p.add_argument("--n", default="8,32,128", help="adaptation images (prior)")
    p.add_argument("--priors", default="0,16,64", help="source pseudo-images (prior)")
    p.add_argument("--lrs", default="0.0001,0.001", help="TENT's Adam learning rates (tent)")
    p.add_argument("--epochs", type=int, default=1, help="TENT's passes over the images (tent)")
    p.add_argument("--images", type=int, default=1000, help="class-balanced test images (tent)")
    a = p.parse_args()
    if a.what == "cost":
        cost(a.run)
    elif a.what == "tent":
        tent(a.run, [float(x) for x in a.lrs.split(",")], a.epochs, a.images)
    else:
        prior(a.run, [int(n) for n in a.n.split(",")], [float(x) for x in a.priors.split(",")])


if __name__ == "__main__":
    main()
