"""Optimizers and learning-rate schedules from a config (optax)."""

from __future__ import annotations

import optax

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("constant", "rsqrt", "cosine", "linear")


class OptimizerConfigError(ValueError):
  """An optimizer or schedule setting that cannot be built."""


def make_schedule(name: str, learning_rate: float, warmup_steps: int, total_steps: int):
  """Linear warm-up, then: constant; T5's ``lr * rsqrt(max(step, warmup))`` shape; cosine or
  linear decay to zero at ``total_steps``."""
  if name not in SCHEDULES:
    raise OptimizerConfigError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
  if learning_rate <= 0:
    raise OptimizerConfigError(f"learning_rate must be positive, got {learning_rate}")
  if warmup_steps < 0:
    raise OptimizerConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
  warm = max(warmup_steps, 1)
  warmup = optax.linear_schedule(learning_rate / warm, learning_rate, warm)
  decay_steps = max(total_steps - warm, 1)
  if name == "constant":
    after = optax.constant_schedule(learning_rate)
  elif name == "rsqrt":
    after = lambda step: learning_rate * (warm / (step + warm)) ** 0.5  # noqa: E731
  elif name == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps)
  else:
    after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  return optax.join_schedules([warmup, after], [warm]) if warmup_steps else after


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, object]:
  """(optimizer, schedule) from ``cfg`` (the config's ``optimizer`` section)."""
  schedule = make_schedule(cfg.schedule, cfg.learning_rate, cfg.warmup_steps, total_steps)
  if cfg.name == "adafactor":
    core = optax.adafactor(
      learning_rate=schedule,
      decay_rate=cfg.adafactor_decay_rate,
      clipping_threshold=None,
      multiply_by_parameter_scale=cfg.adafactor_parameter_scale,
      weight_decay_rate=cfg.weight_decay or None,
    )
  elif cfg.name == "adamw":
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    raise OptimizerConfigError(f"unknown optimizer {cfg.name!r}; choose one of {OPTIMIZERS}")
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  return optax.chain(*chain, core), schedule
