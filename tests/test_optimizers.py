"""The library's AdamW: fused where PyTorch has the kernel, and the same update as the default."""

from __future__ import annotations

import copy

import torch

from afmrl_dagster.encoders.dual_tower import DualTowerConfig, DualTowerHead
from afmrl_dagster.training.encoder_training import make_optimizer
from afmrl_dagster.training.optimizers import adamw, can_fuse


def test_adamw_fuses_float_parameters_on_one_cpu_device_only():
    assert adamw([torch.nn.Parameter(torch.zeros(3))], lr=1e-3).defaults["fused"]
    assert not can_fuse([torch.zeros(3, device="meta")])
    assert not can_fuse([torch.zeros(3), torch.zeros(3, device="meta")])
    assert not can_fuse([torch.zeros(3, dtype=torch.long)])


def test_fused_adamw_takes_the_steps_the_default_takes():
    torch.manual_seed(0)
    head = DualTowerHead(DualTowerConfig(image_dim=24, text_dim=16, embed_dim=8, hidden_dim=12))
    fused, default = copy.deepcopy(head), copy.deepcopy(head)
    fused_optimizer = make_optimizer(fused, 1e-2, 0.01)
    assert all(group["fused"] for group in fused_optimizer.param_groups) and len(fused_optimizer.param_groups) == 2
    default_optimizer = torch.optim.AdamW([{"params": [p for p in default.parameters() if p.dim() >= 2], "weight_decay": 0.01},
                                           {"params": [p for p in default.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                          lr=1e-2, foreach=False)
    for _ in range(5):
        gradients = [torch.randn_like(p) for p in head.parameters()]
        for model, optimizer in ((fused, fused_optimizer), (default, default_optimizer)):
            for p, g in zip(model.parameters(), gradients):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(fused.parameters(), default.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(fused.parameters()), next(head.parameters()))
