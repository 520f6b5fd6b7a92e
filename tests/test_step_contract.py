"""The step contract: the loss sees the step number as a traced scalar (one compiled step serves a
whole curriculum), reports named auxiliary scalars to the progress log, TensorBoard and
metrics/train.jsonl, and can evaluate a whole frozen teacher bank inside the same jitted step,
which is sharded by its axes and carries no optimizer state. The workdir keeps the bank."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from train_helpers import micro_config

from modjax.core.plan import Plan, Slot
from modjax.models import T5, bank
from modjax.store import bank_io
from modjax.train import experiment, losses
from modjax.train.loop import train
from modjax.train.step import make_train_step

SWITCH_AT = 4  # the loss doubles from this step on


def _records(workdir) -> dict[int, dict]:
  with open(os.path.join(str(workdir), "metrics", "train.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, filter(str.strip, f))}


def _tensorboard_tags(workdir) -> set[str]:
  from modjax.data.tf_setup import tf

  tags = set()
  for path in glob.glob(os.path.join(str(workdir), "tensorboard", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags |= {v.tag for v in event.summary.value}
  return tags


def test_step_dependent_loss_switches_mid_run_in_one_compilation(tmp_path, caplog):
  cfg = micro_config(tmp_path, mesh__num_devices=1, train__num_steps=8, train__log_every=2)
  model = T5(experiment.model_config(cfg, experiment.build_vocabulary(cfg).vocab_size))
  base = losses.task_loss(model, model.identity_plan())
  traces = []

  def loss_fn(params, frozen, batch, rng, step):
    traces.append(step)
    ce_sum, weight = base(params, frozen, batch, rng, step)
    late = (step >= SWITCH_AT).astype(jnp.float32)
    return ce_sum * (1.0 + late), weight, {"ce": ce_sum / weight, "late": late}

  with caplog.at_level("INFO", logger="modjax"):
    train(cfg, loss_fn=loss_fn, model=model)
  assert len(traces) == 1 and isinstance(traces[0], jax.core.Tracer)
  records = _records(tmp_path)
  assert sorted(records) == list(range(1, 9))
  for step, r in records.items():  # record `step` is the update made at step number step - 1
    late = step - 1 >= SWITCH_AT
    assert r["late"] == float(late)
    np.testing.assert_allclose(r["loss"], r["ce"] * (2.0 if late else 1.0), rtol=1e-5)
  assert {"train/ce", "train/late", "train/loss"} <= _tensorboard_tags(tmp_path)
  progress = [m for m in caplog.messages if m.startswith("step 8/8")]
  assert progress and " ce " in progress[0] and " late 1" in progress[0], caplog.messages


def test_aux_is_averaged_over_microbatches():
  """Per-microbatch aux values are averaged; the loss stays the exact weighted mean."""
  import optax

  from modjax.train.step import init_state

  def loss_fn(params, frozen, batch, rng, step):
    err = jnp.sum((batch["x"] * params["w"] - batch["y"]) ** 2)
    return err, jnp.float32(batch["x"].shape[0]), {"first_x": batch["x"][0]}

  batch = {"x": jnp.arange(4.0), "y": jnp.ones(4)}
  state = init_state({"w": jnp.float32(0.5)}, optax.sgd(0.0))
  _, one = jax.jit(make_train_step(loss_fn, optax.sgd(0.0)))(state, {}, batch, jax.random.key(0))
  _, two = jax.jit(make_train_step(loss_fn, optax.sgd(0.0), num_microbatches=2))(
    state, {}, batch, jax.random.key(0)
  )
  np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-6)
  assert float(one["first_x"]) == 0.0
  assert float(two["first_x"]) == 0.5  # microbatches take rows (0, 2) and (1, 3): mean of 0, 1


def test_frozen_teacher_bank_distils_in_the_same_step(tmp_path):
  """A student made of new bank entries learns from a frozen teacher bank evaluated in the same
  jitted step; the teacher is sharded on a 2x2x2 mesh, has no optimizer state and does not move;
  the workdir restores the whole bank and the student's plan without the training config."""
  cfg = micro_config(tmp_path, train__num_steps=6, mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  model = T5(experiment.model_config(cfg, experiment.build_vocabulary(cfg).vocab_size))
  teacher = jax.device_get(model.init(jax.random.key(5)))
  assert model.config.num_decoder_layers >= 2  # the student below is shallower than the teacher
  trainable = {"decoder": {"blocks": {"s0": teacher["decoder"]["blocks"]["0"]}}}
  student_plan = Plan(encoder=model.identity_plan().encoder, decoder=(Slot("s0"),))
  teacher_plan = model.identity_plan()

  def loss_fn(params, frozen, batch, rng, step):
    full = bank.merge_params(params, frozen)
    args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    teacher_logits, _ = model(frozen, teacher_plan, *args)
    student_logits, _ = model(full, student_plan, *args)
    weights = batch["decoder_loss_weights"]
    ce_sum, weight = losses.cross_entropy(student_logits, batch["decoder_target_tokens"], weights)
    p_teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits))
    kl = jnp.sum(
      p_teacher * (jax.nn.log_softmax(teacher_logits) - jax.nn.log_softmax(student_logits)), -1
    )
    kd_sum = jnp.sum(kl * weights)
    return ce_sum + kd_sum, weight, {"ce": ce_sum / weight, "kd": kd_sum / weight}

  plans = {"default": teacher_plan, "student": student_plan}
  result = train(
    cfg, loss_fn=loss_fn, init_params=trainable, frozen=teacher, model=model, plans=plans
  )
  assert set(result.state.params) == {"decoder"}
  assert len(jax.tree.leaves(result.state.opt_state)) <= 4 * len(jax.tree.leaves(trainable))
  assert "encoder" not in str(jax.tree.structure(result.state.opt_state))
  kernel = result.frozen["encoder"]["blocks"]["0"]["ffn"]["wi"]["kernel"]
  assert (
    len(kernel.sharding.device_set) == 8 and kernel.sharding.spec != jax.sharding.PartitionSpec()
  )
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), result.frozen, teacher)
  records = _records(tmp_path)
  assert records[1]["kd"] > 0 and records[6]["kd"] < records[1]["kd"]

  stored = bank_io.load_bank(tmp_path)  # no config, no optimizer
  assert stored.step == 6 and stored.plan("student") == student_plan
  ids = jnp.asarray(np.random.default_rng(0).integers(2, 100, (2, 9)), jnp.int32)
  want, _ = model(
    bank.merge_params(jax.device_get(result.state.params), teacher), student_plan, ids, ids
  )
  got, _ = stored.model(stored.params, stored.plan("student"), ids, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
