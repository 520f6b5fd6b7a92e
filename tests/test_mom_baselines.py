"""Mixture-of-Modules against like-for-like vanilla baselines: param-matched baselines match the
MoM's parameter count (routers included) within 0.5%, a baseline grown from the original starts
as the original, the FLOPs model agrees with modjax.models.cost and bounds XLA's count, a continued
schedule takes the original's learning rate with no warm-up, and every run writes compute.json
(parameters, training FLOPs, the capacity drop rate)."""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import TRACEBACK, run_cli_batch, set_key

from modjax.core.model_config import GPT2Config
from modjax.core.presets import get_preset
from modjax.methods.mom import baselines, cost
from modjax.methods.mom.model import MoMGPT2
from modjax.methods.mom.run import train_mom
from modjax.methods.mom.structure import MoMConfig, MoMError
from modjax.models import GPT2
from modjax.models import cost as gpt2_cost
from modjax.store import bank_io
from modjax.train import experiment, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mom_gpt2.py")
DDTP = MoMConfig(bottom_layers=1, num_blocks=1, num_attn=4, num_ffn=4, top_k=1, rounds=4)


def _small_gpt2(layers: int, **kw) -> GPT2Config:
  base = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=layers, n_head=4)
  return GPT2Config(**{**base, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **kw})


# ---- equal parameters ---------------------------------------------------------------------------


def test_param_matched_baselines_count_the_routers_within_half_a_percent():
  preset = dataclasses.replace(get_preset("gpt2-small-cpu"), vocab_size=4096)
  mom = MoMGPT2(preset, DDTP)
  target = baselines.count_params(mom)
  routers = baselines.router_params(DDTP, preset.n_embd)
  assert baselines.count_params(baselines.baseline_model("vanilla", mom)) == target - routers
  wider = baselines.baseline_model("wider_ffn", mom)
  deeper = baselines.baseline_model("extra_layer", mom)
  assert (wider.config.d_ff, wider.config.n_layer) == (1280, 6)  # 1024 + routers / (6 x 513)
  assert (deeper.config.d_ff, deeper.config.n_layer) == (1024, 7)
  for model in (wider, deeper):
    assert abs(baselines.count_params(model) - target) <= baselines.PARAM_TOLERANCE * target
  tiny_cfg = MoMConfig(num_attn=2, num_ffn=2, rounds=2, router_dim=64)
  tiny = MoMGPT2(dataclasses.replace(get_preset("gpt2-tiny"), n_layer=4), tiny_cfg)
  wide = baselines.baseline_model("wider_ffn", tiny)  # no multiple of 64 is close: exact width
  assert (
    wide.config.d_ff % 64
    and abs(baselines.count_params(wide) - baselines.count_params(tiny)) < 1100
  )
  with pytest.raises(MoMError, match="no whole layer"):
    baselines.baseline_model("extra_layer", tiny)


def test_a_grown_baseline_computes_what_the_original_does():
  source = _small_gpt2(3)
  original = GPT2(source).init(jax.random.key(1))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
  reference, _ = GPT2(source)(original, GPT2(source).identity_plan(), ids)
  for target in (dataclasses.replace(source, n_inner=200), dataclasses.replace(source, n_layer=5)):
    grown = baselines.grow(original, source, target, jax.random.key(2))
    shapes = jax.eval_shape(GPT2(target).init, jax.random.key(0))
    assert jax.tree.map(jnp.shape, grown) == jax.tree.map(lambda x: x.shape, shapes)
    logits, _ = GPT2(target)(grown, GPT2(target).identity_plan(), ids)
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0)
  wi = grown["decoder"]["blocks"]["4"]["ffn"]["wi"]["kernel"]
  assert float(jnp.abs(wi).max()) > 0  # the new layer is fresh, only its outputs start at zero


# ---- equal compute ------------------------------------------------------------------------------


def _xla_flops(model, batch: int, length: int) -> float:
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  analysis = jax.jit(lambda p, i: model(p, i)).lower(shapes, ids).compile().cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_flops_model_agrees_with_modjax_cost_and_bounds_xla():
  gpt2 = GPT2(_small_gpt2(3, vocab_size=256, n_positions=64, n_embd=64))
  plan_cost = gpt2_cost.plan_cost(
    gpt2, gpt2.identity_plan(), batch=4, input_length=16, target_length=1
  )
  assert cost.forward_flops(gpt2, 4, 16) == plan_cost.forward_flops
  one = MoMConfig(bottom_layers=1, num_blocks=1, num_attn=1, num_ffn=1, top_k=1, rounds=1,
                  skip=False, top_layers=1, router="linear", capacity_factor=0)  # fmt: skip
  one_module = MoMGPT2(gpt2.config, one)  # a one-module block is a GPT-2 block plus its routers
  routers = cost.router_flops(one, 64, 1, 64) * 2
  assert cost.forward_flops(one_module, 4, 16) == plan_cost.forward_flops + routers
  for dispatch in ("capacity", "dense"):  # capacity 1.0: buffers of 2 x 64 x 2 / 4 < 64 rows
    cfg = MoMConfig(bottom_layers=1, num_blocks=1, num_attn=4, num_ffn=2, top_k=2, rounds=2,
                    router_dim=16, capacity_factor=1.0, dispatch=dispatch)  # fmt: skip
    model = MoMGPT2(gpt2.config, cfg)
    ours, xla = cost.forward_flops(model, 4, 16), _xla_flops(model, 4, 16)
    assert ours <= xla <= 1.1 * ours, (dispatch, ours, xla)
  assert cost.matching_steps(900, 2.0, 1.0) == 1800 and cost.matching_steps(3, 1.0, 7.0) == 1


def test_budget_command_prints_the_steps_that_match_moms_flops(tmp_path):
  flags = ["--config", f"{CONFIG}:tiny", "--config.train.num_steps=150"]
  module = "modjax.methods.mom.baselines"
  runs = [(match, module, [*flags, f"--match={match}"]) for match in ("wider_ffn", "extra_layer")]
  results = run_cli_batch(runs, tmp_path, timeout=300)
  result = results["wider_ffn"]
  assert result.returncode == 0, result.stderr
  mom = MoMGPT2(dataclasses.replace(get_preset("gpt2-tiny"), n_layer=4, vocab_size=256),
                MoMConfig(num_attn=2, num_ffn=2, rounds=2, router_dim=64))  # fmt: skip
  wider = baselines.baseline_model("wider_ffn", mom)
  per_step = [cost.training_flops_per_step(m, 16, 32) for m in (mom, wider)]
  assert int(result.stdout.strip()) == cost.matching_steps(150, *per_step) > 150
  result = results["extra_layer"]
  assert result.returncode == 2 and "no whole layer" in result.stderr, result.stderr
  assert TRACEBACK not in result.stderr


# ---- runs: compute.json, the continued schedule --------------------------------------------------


def _config(workdir, **values):
  spec = importlib.util.spec_from_file_location("modjax_configs_mom_gpt2", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config("tiny")
  small = {
    "workdir": str(workdir), "train__batch_size": 8, "data__targets_length": 16,
    "data__vocab_size": 200, "mom__router_dim": 16, "checkpoint__every_steps": 1,
    "optimizer__warmup_steps": 2, "mesh__num_devices": 1,
  }  # fmt: skip
  for key, value in {**small, **values}.items():
    set_key(cfg, key.replace("__", "."), value)
  return cfg


def _records(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics" / "train.jsonl").open()]


def _compute(workdir) -> dict:
  return json.loads((workdir / "compute.json").read_text())


def test_optimizer_schedule_offset_continues_a_schedule():
  cfg = _config("/unused").optimizer
  cfg.schedule_start, cfg.schedule_steps = 3, 12
  _, schedule = optim.make_optimizer(cfg, total_steps=2)
  base = optim.make_schedule("cosine", 1e-3, 2, 12)
  np.testing.assert_allclose([schedule(s) for s in range(4)], [base(3 + s) for s in range(4)])
  cfg.schedule_start = -1
  with pytest.raises(optim.OptimizerConfigError, match="schedule_start=-1"):
    optim.make_optimizer(cfg, total_steps=2)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
  """A 3-step vanilla run (``mom.baseline=vanilla``) on a 12-step cosine schedule."""
  workdir = tmp_path_factory.mktemp("mom_baselines") / "original"
  cfg = _config(workdir, train__num_steps=3, mom__baseline="vanilla", optimizer__schedule_steps=12)
  assert train_mom(cfg).last_step == 3
  return workdir


def test_a_vanilla_run_records_its_parameters_and_flops(original):
  record = _compute(original)
  model = bank_io.load_bank(original).model
  assert isinstance(model, GPT2) and model.config.n_layer == 4
  assert record["kind"] == "vanilla" and record["steps"] == 3 and record["router_params"] == 0
  assert record["params"] == baselines.count_params(model) < record["mom_params"]
  per_step = cost.training_flops_per_step(model, 8, 16)
  assert (record["training_flops_per_step"], record["training_flops"]) == (per_step, 3 * per_step)
  assert record["capacity_dropped"] is None


def test_param_matched_control_continues_the_originals_schedule(original, tmp_path):
  workdir = tmp_path / "control"
  cfg = _config(
    workdir, train__num_steps=2, mom__baseline="wider_ffn", mom__init_from=str(original),
    mom__continue_schedule=True, optimizer__warmup_steps=50, optimizer__learning_rate=5e-3,
  )  # fmt: skip
  assert train_mom(cfg).last_step == 2
  base = optim.make_schedule("cosine", 1e-3, 2, 12)  # the original's, not this config's
  rates = [r["learning_rate"] for r in _records(workdir)]
  np.testing.assert_allclose(rates, [base(3), base(4)], rtol=1e-6)
  record = _compute(workdir)
  assert record["kind"] == "wider_ffn" and record["d_ff"] > 512
  assert abs(record["params"] - record["mom_params"]) <= 0.005 * record["mom_params"]
  assert bank_io.load_bank(workdir).model.config.n_inner == record["d_ff"]


def test_continuing_an_ended_schedule_is_a_one_line_error(original, tmp_path):
  cfg = _config(
    tmp_path / "late", train__num_steps=2, mom__init_from=str(original),
    mom__continue_schedule=True, optimizer__schedule_steps=3,
  )  # fmt: skip
  with pytest.raises(experiment.ConfigError, match="learning rate is 0; give a longer one"):
    train_mom(cfg)
  cfg = _config(tmp_path / "none", mom__continue_schedule=True)
  with pytest.raises(experiment.ConfigError, match="needs config.mom.init_from"):
    train_mom(cfg)
  assert not (tmp_path / "late").exists() and not (tmp_path / "none").exists()


def test_a_mom_run_reports_its_capacity_drops(original, tmp_path):
  workdir = tmp_path / "mom"
  cfg = _config(
    workdir, train__num_steps=2, mom__init_from=str(original), mom__gate="straight_through",
    mom__capacity_factor=0.5,
  )  # fmt: skip
  assert train_mom(cfg).last_step == 2
  dropped = [r["router/dropped"] for r in _records(workdir)]
  record = _compute(workdir)
  assert record["kind"] == "mom" and record["params"] == record["mom_params"]
  assert record["router_params"] > 0 and record["steps"] == 2
  summary = record["capacity_dropped"]
  assert summary["steps"] == 2 and summary["mean"] == pytest.approx(np.mean(dropped))
  assert summary["max"] == max(dropped) > 0  # half-size buffers drop routed tokens
