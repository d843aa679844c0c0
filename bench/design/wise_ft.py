"""Design probe for WiSE-FT (Wortsman et al., 2022): does the weight-space average of the linear-
probe model (the pretrained base and phase 1's head) and the fine-tuned one hold up better under
CIFAR-10-C, and what does it cost in clean accuracy?

It trains a recipe (default `lean`, `--set` as for `run`) with the tool's own `fit`, keeping the
weights at the end of phase 1, then for each mixing weight alpha (0: the linear probe, 1: the
fine-tuned model) loads (1 - alpha) * phase-1 + alpha * fine-tuned (every float tensor: weights and
BatchNorm statistics) and measures clean accuracy on `--test` class-balanced test images and the
CIFAR-10-C mean (15 corruptions x 5 severities) on the `--images` class-balanced test images a run's
own analysis uses (same seed, so the cells are paired with the run's report). The frozen steps up to
`finetune_from` are the same in both models: their activations are computed once, and only the rest
runs per alpha.

usage: python bench/design/wise_ft.py [--set FIELD=VALUE ...] [--images 150] [--test 2000]
                                      [--alphas 0 .5 .7 1]
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from cifar_transfer.analysis.analyze import balanced_sample
from cifar_transfer.analysis.robustness import ORIGIN, summarise
from cifar_transfer.data import corruptions
from cifar_transfer.data.augment import as_tensors
from cifar_transfer.data.cifar import load_cifar10, split
from cifar_transfer.machine import cpu_model
from cifar_transfer.model.inference import predict_logits
from cifar_transfer.model.network import Part, build_model, folded, place
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import preset
from cifar_transfer.training.inputs import cache_activations
from cifar_transfer.training.loop import fit


def train(recipe, splits, pretrained) -> tuple[torch.nn.Module, dict, float]:
    """The trained model and its weights at the end of phase 1 (the linear probe)."""
    torch.manual_seed(recipe.seed)
    cpu = torch.device("cpu")
    model = place(build_model(recipe, pretrained), recipe, cpu)
    probe = {}

    def keep_phase1(history: list[dict], *_) -> None:
        if len(history) == recipe.head_epochs:
            probe.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    t0 = time.perf_counter()
    train, val = (as_tensors(d.images, d.labels, cpu) for d in (splits.train, splits.val))
    fit(model, recipe, train, val, on_epoch=keep_phase1)
    return model, probe, time.perf_counter() - t0


def evaluation_sets(
    recipe, test, images: int, test_images: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Clean test images first, then each corruption x severity of the analysis' sample (a list of
    arrays)."""
    clean = balanced_sample(test, test_images, recipe.seed)
    index = balanced_sample(test, images, recipe.seed)
    sets, labels = [test.images[clean]], [test.labels[clean]]
    for name in corruptions.BENCHMARK:
        for s in corruptions.SEVERITIES:
            sets.append(corruptions.corrupt(test.images[index], name, s, recipe.seed))
            labels.append(test.labels[index])
    return sets, labels


def mixed(probe: dict, tuned: dict, alpha: float) -> dict:
    """(1 - alpha) * probe + alpha * tuned; counters (num_batches_tracked) as the fine-tuned
    model has them."""
    return {
        k: torch.lerp(probe[k], v, alpha) if v.is_floating_point() else v for k, v in tuned.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--json")
    a = ap.parse_args()
    recipe = preset("lean").with_overrides(["analysis=false", *a.overrides])
    train_set, test = load_cifar10(os.environ.get("CIFAR_TRANSFER_DATA"), allow_download=False)
    splits = split(train_set, test, recipe.train_size, recipe.val_size, recipe.seed)
    model, probe, train_s = train(
        recipe, splits, load_pretrained(os.environ["CIFAR_TRANSFER_WEIGHTS"])
    )
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    sets, labels = evaluation_sets(recipe, test, a.images, a.test)
    # the same for every alpha: phase 2 does not train the steps before `finetune_from`
    frozen = cache_activations(
        model,
        tuple(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in sets),
        "stem",
        recipe.finetune_from,
        recipe,
    )
    print(
        f"{cpu_model()}; {recipe.name} {' '.join(a.overrides)}; trained in {train_s:.0f} s; "
        f"corrupted and cached in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    rows = []
    for alpha in a.alphas:
        t0 = time.perf_counter()
        model.load_state_dict(mixed(probe, tuned, alpha))
        tail = Part(folded(model.eval()), recipe.finetune_from)
        hits = [
            (
                predict_logits(tail, x, recipe.eval_batch_size, recipe.precision).argmax(1).numpy()
                == y
            ).mean()
            for x, y in zip(frozen, labels)
        ]
        table = {
            name: [float(h) for h in hits[1 + 5 * i : 6 + 5 * i]]
            for i, name in enumerate(corruptions.BENCHMARK)
        }
        summary = summarise(table, float(hits[0]), a.images, ORIGIN)
        rows.append({"alpha": alpha, **summary, "seconds": time.perf_counter() - t0})
        worst = sorted(table, key=lambda n: np.mean(table[n]))[:3]
        print(
            f"alpha {alpha:.2f}: clean {hits[0]:.2%} ({a.test} images) | CIFAR-10-C mean "
            f"{summary['mean_corrupted']:.2%} ({a.images} images) | weakest "
            + ", ".join(f"{n} {np.mean(table[n]):.1%}" for n in worst)
            + f" | {rows[-1]['seconds']:.0f} s",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"cpu": cpu_model(), "recipe": recipe.dumps(), "train_s": train_s, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
