"""The Modular Transformers training loss, as a step-contract ``loss_fn``.

Loss = ce * task cross-entropy + kd * logits KD (KL(teacher || student) at temperature T, times
T^2) + (hidden * hidden-state distance (MSE by default) + attn * attention KL) averaged over the
replaced spans. The teacher (the frozen original layers) runs inside the same step, deterministically, and gives
the logits and the per-layer hidden states and attention maps the module outputs are compared
with. Every term is returned as an aux scalar (per-token means) beside ``p`` and the drawn
granularity of each stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from modjax.methods.modular.modules import ModularError, bank_granularities, num_layers
from modjax.methods.modular.replacing import (
  HIDDEN_FORMS,
  Curriculum,
  draw_choices,
  replacing_forward,
)
from modjax.models import bank
from modjax.models.stack import DEFAULT_COLLECT
from modjax.train.losses import cross_entropy


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the loss terms and the KD temperature (reconstructions: the paper publishes no
  values)."""

  ce: float = 1.0
  kd: float = 1.0
  temperature: float = 1.0
  hidden: float = 1.0
  attn: float = 1.0
  # the hidden-state distance (replacing.hidden_mse): raw, normalized or cosine
  hidden_form: str = "raw"

  def __post_init__(self):
    if self.hidden_form not in HIDDEN_FORMS:
      raise ModularError(
        f"hidden_form {self.hidden_form!r} is unknown; choose one of {HIDDEN_FORMS}"
      )
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "hidden_form":
        continue
      if not isinstance(value, (int, float)) or value < 0:
        raise ModularError(f"loss weight {field.name} must be a number >= 0, got {value!r}")
    if self.temperature <= 0:
      raise ModularError(f"KD temperature must be > 0, got {self.temperature!r}")


def logits_kd(student_BLV, teacher_BLV, weights_BL, temperature: float = 1.0):
  """Sum over weighted tokens of KL(teacher || student) at ``temperature``, times T^2."""
  t = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / temperature, axis=-1)
  kl_BL = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl_BL * weights_BL.astype(jnp.float32)) * temperature**2


def teacher_outputs(model, frozen, plan, batch: Mapping):
  """The teacher's logits and per-layer hidden states and attention maps (no dropout, no
  gradient)."""
  logits, inter = model.apply_batch(frozen, plan, batch, collect=DEFAULT_COLLECT)
  return jax.lax.stop_gradient((logits, inter))


def modular_loss(
  model,
  meta: Mapping,
  curriculum: Curriculum,
  weights: LossWeights = LossWeights(),
  *,
  remat: bool = True,
):
  """``loss_fn(params, frozen, batch, rng, step)`` for a bank split by ``split_trainable``:
  ``params`` holds the modules, ``frozen`` the teacher; granularities come from ``meta``.

  The draws come from the step's ``rng``, so with microbatches each microbatch draws its own
  granularity and replacements (still one decision per slot for all of its examples). Without
  ``rng`` (evaluation) there is no dropout and the draws follow the step number alone."""
  granularities = {s: bank_granularities(meta, s) for s in model.stacks}
  if not any(granularities.values()):
    raise ModularError("the bank metadata records no modules; call add_modules first")
  layers = {s: num_layers(model, s) for s in model.stacks}
  teacher_plan = model.identity_plan()

  def loss_fn(params, frozen, batch, rng, step):
    deterministic = rng is None
    if rng is None:
      rng = jax.random.fold_in(jax.random.key(0), step)
    choice_rng, dropout_rng = jax.random.split(rng)
    teacher_logits, teacher = teacher_outputs(model, frozen, teacher_plan, batch)
    choices, p = draw_choices(choice_rng, step, curriculum, granularities, layers)
    logits, stats = replacing_forward(
      model,
      bank.merge_params(params, frozen),
      teacher_plan,
      batch,
      choices,
      granularities,
      teacher=teacher,
      deterministic=deterministic,
      dropout_rng=None if deterministic else dropout_rng,
      hidden_form=weights.hidden_form,
      remat=remat,
    )
    targets, loss_weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    ce_sum, weight = cross_entropy(logits, targets, loss_weights)
    kd_sum = logits_kd(logits, teacher_logits, loss_weights, weights.temperature)
    replaced = sum(s["replaced"] for s in stats.values())
    spans = jnp.maximum(replaced, 1.0)
    hidden = sum(s["hidden"] for s in stats.values()) / spans
    attn = sum(s["attn"] for s in stats.values()) / spans
    loss_sum = (
      weights.ce * ce_sum
      + weights.kd * kd_sum
      + (weights.hidden * hidden + weights.attn * attn) * weight
    )
    tokens = jnp.maximum(weight, 1.0)
    aux = {"ce": ce_sum / tokens, "kd": kd_sum / tokens, "hidden": hidden, "attn": attn, "p": p}
    for stack, choice in choices.items():
      aux[f"g_{stack}"] = jnp.asarray(granularities[stack], jnp.float32)[choice.index]
      aux[f"replaced_{stack}"] = stats[stack]["replaced"]
    return loss_sum, weight, aux

  return loss_fn
