"""The library's AdamW (fused kernel) against PyTorch's default CPU AdamW, step by step.

Two models the quality ladder trains thousands of steps of: the dual-tower head (the encoder
over frozen tower features, the ladder's batch of 32 pairs) and the compact attribute
generator (SFT, batch 64). For each, two copies of one model, one per optimizer, take
alternating training steps on the same batch (forward, backward, optimizer step), so machine
load drifts affect both alike; the optimizer step alone is timed too. Features are random.

    python benchmarks/optimizer_step.py [--steps 40] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from afmrl_dagster.attributes.generator import AttributeGenerator, GeneratorConfig
from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead, ListingFeatures
from afmrl_dagster.readme import publish_result
from afmrl_dagster.training.agcl import AGCLConfig, AGCLLoss
from afmrl_dagster.training.encoder_training import FeatureTensors, ProductBatchSampler, batch_loss, make_optimizer
from afmrl_dagster.training.optimizers import adamw

BLOCK = "optimizer-step"


def default_adamw(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """``optimizer``'s parameter groups and hyperparameters under PyTorch's default (unfused) AdamW."""
    groups = [{key: value for key, value in group.items() if key not in ("fused", "foreach")} for group in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=optimizer.defaults["lr"])


def alternate(models: dict, step, steps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median seconds of a whole step and of the optimizer step alone, per arm."""
    times = {name: {"step": [], "optimizer": []} for name in models}
    for index in range(warmup + steps):
        for name, (model, optimizer) in models.items():
            started = time.perf_counter()
            step(model).backward()
            before = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ended = time.perf_counter()
            if index >= warmup:
                times[name]["step"].append(ended - started)
                times[name]["optimizer"].append(ended - before)
    return {name: {kind: statistics.median(values) for kind, values in kinds.items()} for name, kinds in times.items()}


def head_arms(seed: int) -> tuple[dict, callable, int]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n = 2000
    features = ListingFeatures([f"l{i}" for i in range(n)], np.abs(rng.normal(size=(n, 1280))), rng.random(n) > 0.05,
                               rng.normal(size=(n, 384)))
    tensors = FeatureTensors.from_features(features)
    product_ids = [f"p{i // 2}" for i in range(n)]
    _, codes = np.unique(product_ids, return_inverse=True)
    anchors, positives = ProductBatchSampler(product_ids, [f"line{(i // 2) % 20}" for i in range(n)], 32, seed=seed).epoch(0)[0]
    loss_fn = AGCLLoss(AGCLConfig(use_weights=False, use_false_negative_mask=False))
    base = DualTowerHead(DualTowerConfig())
    library, default = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    arms = {"PyTorch default AdamW": (default, default_adamw(make_optimizer(default, 1e-3, 0.01))),
            "library AdamW (fused)": (library, make_optimizer(library, 1e-3, 0.01))}

    def step(head):
        return batch_loss(head, loss_fn, tensors, anchors, positives, codes, None)["loss"]

    return arms, step, sum(p.numel() for p in base.parameters())


def generator_arms(seed: int) -> tuple[dict, callable, int]:
    torch.manual_seed(seed)
    batch, vocabulary, length = 64, 68, 14
    image, text = torch.randn(batch, 1280).abs(), torch.randn(batch, 384)
    mask = torch.ones(batch, dtype=torch.bool)
    tokens = torch.randint(4, vocabulary, (batch, length))
    base = AttributeGenerator(vocabulary, 1280, 384, GeneratorConfig())
    library, default = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    arms = {"PyTorch default AdamW": (default, default_adamw(adamw(default.parameters(), lr=2e-3, weight_decay=0.01))),
            "library AdamW (fused)": (library, adamw(library.parameters(), lr=2e-3, weight_decay=0.01))}

    def step(model):
        logits = model(image, mask, text, tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocabulary), tokens[:, 1:].reshape(-1))

    return arms, step, sum(p.numel() for p in base.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-results", metavar="FILE", help=f"replace the {BLOCK} block of this file with the table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"Median of {args.steps} alternating steps after {args.warmup} warm-up, random features, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads. A step: forward, backward, optimizer step.",
        "",
        "| model | parameters | optimizer | step ms | optimizer step ms | step ratio library / default |",
        "|---|---|---|---|---|---|",
    ]
    for label, build in (("dual-tower head, batch 32 pairs (InfoNCE)", head_arms), ("compact generator, batch 64 (SFT)", generator_arms)):
        arms, step, parameters = build(args.seed)
        result = alternate(arms, step, args.steps, args.warmup)
        default, library = result["PyTorch default AdamW"], result["library AdamW (fused)"]
        for name, times in result.items():
            ratio = f"**{library['step'] / default['step']:.2f}**" if times is library else ""
            lines.append(f"| {label} | {parameters:,} | {name} | {times['step'] * 1e3:.2f} | {times['optimizer'] * 1e3:.2f} | {ratio} |")
        print(f"optimizer_step: {label}: step {default['step'] * 1e3:.2f} -> {library['step'] * 1e3:.2f} ms", file=sys.stderr)
    return publish_result("\n".join(lines), args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
