"""Design probe for the `lean` preset, step 2: train on the activations `cache.py` saved.

Phase 1: the 128-64 head on pooled base features (Adam 1e-3, batch 64, a random mirror per image per
step). Phase 2: the blocks from layer3.BLOCK on (BLOCK 6: layer4 only) and the head, SGD nesterov
with warm-up and cosine, label smoothing, bf16 autocast. Prints validation accuracy per epoch and
the test accuracy at the end. The exploration the preset was chosen with; `cifar-transfer run
--preset lean` is the real thing.

usage: python bench/design/train.py --cache /tmp/lean-design/cache128_s0_b3.pt --blk 3 --epochs 5
--bn frozen
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from cifar_transfer.model.network import build_model
from cifar_transfer.model.weights import load_pretrained
from cifar_transfer.recipe import Recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument(
        "--blk", type=int, default=6, help="first trained block of layer3 (6: layer4 only)"
    )
    ap.add_argument("--head-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--bn", default="train", choices=["train", "frozen"])
    ap.add_argument("--ls", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-5)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument(
        "--shift",
        type=int,
        default=0,
        help="random shift of the cached maps by up to this many cells",
    )
    a = ap.parse_args()
    torch.manual_seed(0)
    c = torch.load(a.cache)
    m = build_model(Recipe(resolution=128), load_pretrained(os.environ["CIFAR_TRANSFER_WEIGHTS"]))
    m = m.to(memory_format=torch.channels_last)
    head = m.head
    body = torch.nn.Sequential(*m.backbone.layer3[a.blk :], *m.backbone.layer4)
    g = torch.Generator().manual_seed(0)
    xt, xf, yt = c["train"], c["train_flip"], c["ytrain"]
    n = len(yt)

    def suffix(x: torch.Tensor) -> torch.Tensor:
        return head(torch.flatten(m.backbone.avgpool(body(x)), 1))

    def batches(bs: int) -> list[torch.Tensor]:
        p = torch.randperm(n, generator=g)
        return [p[i : i + bs] for i in range(0, n, bs)]

    def shift(x: torch.Tensor, p: int) -> torch.Tensor:
        k, _, h, w = x.shape
        padded = F.pad(x.float(), (p, p, p, p), mode="reflect").to(x.dtype)
        dy, dx = torch.randint(0, 2 * p + 1, (2, k), generator=g)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        out = padded.permute(0, 2, 3, 1)[torch.arange(k)[:, None, None], rows, cols].permute(
            0, 3, 1, 2
        )
        return out.contiguous(memory_format=torch.channels_last)

    def mirror_or_not(a0: torch.Tensor, a1: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        f = torch.rand(len(idx), generator=g) < 0.5
        return torch.where(f.view(-1, *[1] * (a0.ndim - 1)), a1[idx], a0[idx])

    @torch.inference_mode()
    def run(fwd, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
        out = []
        for i in range(0, len(x), batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out.append(fwd(x[i : i + batch]).float())
        return torch.cat(out)

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        return (run(suffix, x).argmax(1) == y).float().mean().item()

    start = time.perf_counter()
    body.eval()
    t0 = time.perf_counter()
    pooled = [
        run(lambda x: torch.flatten(m.backbone.avgpool(body(x)), 1), x) for x in (xt, xf, c["val"])
    ]
    print(f"pooled features {time.perf_counter() - t0:.1f}s", flush=True)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, eps=1e-7)
    for e in range(a.head_epochs):
        head.train()
        for idx in batches(64):
            loss = F.cross_entropy(
                head(mirror_or_not(pooled[0], pooled[1], idx)), yt[idx], label_smoothing=a.ls
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.inference_mode():
            print(
                f"head epoch {e + 1}: val "
                f"{(head(pooled[2]).argmax(1) == c['yval']).float().mean():.4f}",
                flush=True,
            )
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": a.wd},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0},
        ],
        lr=a.lr,
        momentum=0.9,
        nesterov=True,
    )
    steps = math.ceil(n / a.bs)
    total, warm = a.epochs * steps, round(a.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))
        ),
    )
    for e in range(a.epochs):
        t0 = time.perf_counter()
        body.train()
        head.train()
        if a.bn == "frozen":
            for mod in body.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.eval()
        for idx in batches(a.bs):
            x = mirror_or_not(xt, xf, idx)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = suffix(shift(x, a.shift) if a.shift else x).float()
            loss = F.cross_entropy(out, yt[idx], label_smoothing=a.ls)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        body.eval()
        head.eval()
        print(
            f"epoch {e + 1}: val {accuracy(c['val'], c['yval']):.4f} "
            f"{time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    print(
        f"TEST {accuracy(c['test'], c['ytest']):.4f} total {time.perf_counter() - start:.1f}s "
        f"{vars(a)}"
    )


if __name__ == "__main__":
    main()
