"""AdamW parameter groups and the warm-up + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from blip2_megatron.config import TrainConfig
from blip2_megatron.training.optim import WarmupCosineSchedule, build_optimizer, parameter_groups


def test_no_weight_decay_on_biases_norms_and_frozen_params():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, LN weight, LN bias
    frozen = {id(p) for p in model[2].parameters()}
    assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}


def test_all_frozen_model_is_refused():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())
    assert parameter_groups([], 0.1) == []


def test_warmup_then_cosine_per_step():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=10)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = WarmupCosineSchedule(opt, cfg, total_steps=110, steps_per_epoch=11)
    assert sched.get_last_lr()[0] == pytest.approx(1e-5)
    assert sched.lr_at(5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert sched.lr_at(10) == pytest.approx(1e-3)
    assert sched.lr_at(60) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert sched.lr_at(110) == pytest.approx(1e-4)
    for _ in range(37):
        sched.step()
    restored = WarmupCosineSchedule(opt, cfg, total_steps=110, steps_per_epoch=11)
    restored.load_state_dict(sched.state_dict())
    assert restored.get_last_lr() == sched.get_last_lr() == [pytest.approx(sched.lr_at(37))]


def test_cosine_per_epoch_holds_within_an_epoch():
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup_lr=1e-3, warmup_steps=0, schedule="cosine_epoch")
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = WarmupCosineSchedule(opt, cfg, total_steps=50, steps_per_epoch=10)
    assert sched.lr_at(0) == sched.lr_at(9) == pytest.approx(1e-3)
    assert sched.lr_at(10) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi / 5)))
    assert sched.lr_at(10) == sched.lr_at(19)
