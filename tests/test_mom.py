"""Mixture-of-Modules: a one-module MoM block is a GPT-2 block (modjax's and transformers'),
SKIP adds nothing, gates and the balancing loss match hand computation, the capacity and gather
dispatches equal the dense reference (values and gradients), causality holds, a pool sharded over
four devices gives the same loss, and ``python -m modjax.train`` trains a MoM bank."""

import dataclasses
import gzip
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from train_helpers import TRACEBACK, run_cli_batch, run_module, set_key

from modjax.core import registry, sharding
from modjax.core.errors import ConfigError
from modjax.core.model_config import GPT2Config
from modjax.core.presets import get_preset
from modjax.methods.mom.block import mom_block
from modjax.methods.mom.dispatch import Capacity, Dense, Gather, transport
from modjax.methods.mom.model import MoMGPT2
from modjax.methods.mom.pools import mom_bank
from modjax.methods.mom.routers import (
  Routing,
  balance_loss,
  init_router,
  initial_state,
  router_scores,
  top_k_gates,
)
from modjax.methods.mom.run import load_mom_bank, structure_from_config, train_mom
from modjax.methods.mom.structure import MoMConfig, MoMError
from modjax.models import GPT2, bank
from modjax.nn.layers import Block, FeedForward, Norm, causal_bias
from modjax.store import bank_io
from modjax.store.hf import import_checkpoint
from modjax.train.experiment import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mom_gpt2.py")
ONE_MODULE = dict(
  bottom_layers=0, num_blocks=1, num_attn=1, num_ffn=1, top_k=1, rounds=1, skip=False,
  anchor=False, top_layers=0,
)  # fmt: skip


def _gpt2_config(layers: int, **kw) -> GPT2Config:
  base = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=layers, n_head=4)
  drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  return GPT2Config(**{**base, **drop, **kw})


def _model(seed=0, **mom) -> tuple[MoMGPT2, dict]:
  cfg = MoMConfig(**mom)
  model = MoMGPT2(_gpt2_config(cfg.vanilla_depth), cfg)
  return model, model.init(jax.random.key(seed))


def _ids(batch=2, length=12, seed=0, vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def _x(batch=2, length=10, d=32, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, d)), jnp.float32)


# ---- a one-module MoM is GPT-2 --------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["dense", "capacity"])
@pytest.mark.parametrize("router", ["gru", "linear"])
def test_one_module_block_equals_the_gpt2_block_with_the_same_weights(dispatch, router):
  gpt2 = GPT2(_gpt2_config(1))
  vanilla = gpt2.init(jax.random.key(3))
  cfg = MoMConfig(**ONE_MODULE, router=router, dispatch=dispatch)
  params = mom_bank(vanilla, cfg, 1, jax.random.key(4))
  x, bias = _x(), causal_bias(10)
  mask = jnp.ones(x.shape[:2])
  ours, _, _ = mom_block(gpt2.block_spec(), cfg, params["decoder"], 0, x, bias, mask)
  block = vanilla["decoder"]["blocks"]["0"]
  ref, _, _ = Block(gpt2.block_spec()).apply({"params": block}, x, bias)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_one_module_mom_model_matches_transformers_gpt2(hf_checkpoint):
  directory, hf_model = hf_checkpoint("gpt2")  # 3 layers: bottom, one-module MoM block, top
  config, vanilla = import_checkpoint(directory)
  cfg = MoMConfig(**{**ONE_MODULE, "bottom_layers": 1, "top_layers": 1})
  model = MoMGPT2(config, cfg)
  params = mom_bank(vanilla, cfg, config.n_layer, jax.random.key(0))
  lengths = np.asarray([16, 9, 4])
  mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, np.random.default_rng(2).integers(0, config.vocab_size, (3, 16)), 0)
  ours, _ = model(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  with torch.no_grad():
    ref = hf_model(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      use_cache=False,
    ).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=0)


# ---- SKIP, gates and the balancing loss ------------------------------------------------------


def _linear_router(slots: int, bias) -> dict:
  return {"input": {"kernel": jnp.zeros((32, slots)), "bias": jnp.asarray(bias, jnp.float32)}}


@pytest.mark.parametrize("dispatch", ["dense", "capacity"])
def test_skip_adds_nothing(dispatch):
  mom = {**ONE_MODULE, "skip": True, "rounds": 2, "router": "linear", "dispatch": dispatch}
  model, params = _model(**mom)
  spec, cfg = model.block_spec(), model.mom
  x, mask, bias = _x(), jnp.ones((2, 10)), causal_bias(10)
  to_skip = _linear_router(2, [0.0, 50.0])
  decoder = dict(params["decoder"], routers={"attn_0": to_skip, "ffn_0": to_skip})
  out, _, _ = mom_block(spec, cfg, decoder, 0, x, bias, mask)
  np.testing.assert_array_equal(out, x)  # every token chose SKIP in every round: x unchanged

  # the FFN module and SKIP both kept (K=2, Switch gates) at (p, 1 - p): x + p * ffn(norm(x))
  two = dataclasses.replace(cfg, top_k=2, rounds=1, gate="softmax")
  decoder["routers"] = {"attn_0": to_skip, "ffn_0": _linear_router(2, [0.3, 0.0])}
  out, _, _ = mom_block(spec, two, decoder, 0, x, bias, mask)
  p = float(jax.nn.softmax(jnp.asarray([0.3, 0.0]) / two.temperature)[0])
  pool = jax.tree.map(lambda a: a[0], params["decoder"]["pools"]["ffn_0"])
  h = Norm("layer", spec.norm_eps).apply({"params": pool["ffn_norm"]}, x)
  expected = x + p * FeedForward(spec).apply({"params": pool["ffn"]}, h, True)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def _numpy_gates(scores, temperature, k):
  z = scores / temperature
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  index = np.argsort(-probs, axis=-1)[..., :k]
  kept = np.take_along_axis(probs, index, -1)
  return probs, index, kept / kept.sum(-1, keepdims=True)


def test_top_k_renormalisation_and_balancing_loss_match_hand_computation():
  cfg = MoMConfig(num_attn=3, num_ffn=3, top_k=2, skip=True, temperature=0.5)
  rng = np.random.default_rng(0)
  scores = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(2)]
  mask = np.asarray([[1, 1, 1], [1, 1, 0]], np.float32)  # one padding token
  routings = [top_k_gates(jnp.asarray(s), jnp.asarray(mask), cfg) for s in scores]
  terms = []
  for s, r in zip(scores, routings, strict=True):
    probs, index, weight = _numpy_gates(s, 0.5, 2)
    np.testing.assert_allclose(r.probs_BLS, probs, atol=1e-6)
    np.testing.assert_array_equal(r.index_BLK, index)
    np.testing.assert_allclose(r.weight_BLK, weight * mask[..., None], atol=1e-6)
    real = mask.astype(bool)
    f = np.bincount(index[..., 0][real], minlength=4) / real.sum()
    big_p = probs[real].mean(0)
    terms.append((f, big_p))
  per_router = [4 * np.sum(f * p) for f, p in terms]
  depthwise = balance_loss({"attn": routings[:1], "ffn": routings[1:]}, cfg)
  np.testing.assert_allclose(depthwise, per_router[0] + per_router[1], rtol=1e-6)
  pooled = balance_loss({"attn": routings}, dataclasses.replace(cfg, balance="pooled"))
  f_mean, p_mean = (terms[0][0] + terms[1][0]) / 2, (terms[0][1] + terms[1][1]) / 2
  np.testing.assert_allclose(pooled, 4 * np.sum(f_mean * p_mean), rtol=1e-6)
  half = jnp.full((1, 4, 2), 0.5)
  uniform = Routing(
    half, jnp.asarray([[[0], [1], [0], [1]]]), jnp.ones((1, 4, 1)), jnp.ones((1, 4))
  )
  assert float(balance_loss({"attn": [uniform], "ffn": [uniform]}, cfg)) == pytest.approx(2.0)


def test_gru_router_is_torchs_gru_cell_and_mlp_router_and_raw_gates_match_by_hand():
  cfg = MoMConfig(num_attn=3, num_ffn=3, top_k=2, router="gru", router_dim=8)
  params = init_router("gru", jax.random.key(0), 32, 4, 8)
  for name in ("input", "recurrent"):  # non-zero biases, so their placement is checked too
    params[name]["bias"] = jnp.linspace(-0.3, 0.3, 24)
  cell = torch.nn.GRUCell(32, 8)
  with torch.no_grad():
    for ours, theirs in (("input", "ih"), ("recurrent", "hh")):
      getattr(cell, f"weight_{theirs}").copy_(torch.tensor(np.array(params[ours]["kernel"]).T))
      getattr(cell, f"bias_{theirs}").copy_(torch.tensor(np.array(params[ours]["bias"])))
  x, state, h = _x(length=5), initial_state(cfg, _x(length=5)), torch.zeros(10, 8)
  for _ in range(3):  # the state carries across rounds
    scores, state = router_scores("gru", params, x, state)
    h = cell(torch.tensor(np.array(x).reshape(10, 32)), h)
    np.testing.assert_allclose(state.reshape(10, 8), h.detach().numpy(), atol=1e-6)
    out = params["output"]
    np.testing.assert_allclose(scores, state @ out["kernel"] + out["bias"], atol=1e-6)

  mlp = init_router("mlp", jax.random.key(1), 32, 4, 8)
  scores, _ = router_scores("mlp", mlp, x, None)
  hidden = np.maximum(np.asarray(x) @ mlp["input"]["kernel"] + mlp["input"]["bias"], 0)
  expected = hidden @ mlp["output"]["kernel"] + mlp["output"]["bias"]
  np.testing.assert_allclose(scores, expected, atol=1e-6)
  raw = top_k_gates(scores, jnp.ones((2, 5)), dataclasses.replace(cfg, gate="raw"))
  np.testing.assert_allclose(raw.weight_BLK, -np.sort(-expected, axis=-1)[..., :2], atol=1e-6)


# ---- dispatch, causality, sharding ------------------------------------------------------------

DEEP = dict(
  bottom_layers=1, num_blocks=2, num_attn=3, num_ffn=2, top_k=2, rounds=2, skip=True,
  anchor=True, top_layers=0, router_dim=16,
)  # fmt: skip


def _probe_loss(model, ids, probe):
  def loss(params):
    logits, aux = model(params, ids)
    return jnp.sum(logits * probe) + aux["balance_loss"], logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _probe_grads(model, ids, probe):
  """jit: (logits, gradients of sum(logits * probe) + balance_loss, gradients of the task term
  sum(logits * probe) alone). One forward; both pullbacks in one batched backward pass, so the
  task gradient costs no second compilation."""

  def forward(params):
    logits, aux = model(params, ids)
    return logits, aux["balance_loss"]

  def run(params):
    (logits, balance), pullback = jax.vjp(forward, params)
    cotangents = (jnp.stack([probe, probe]), jnp.asarray([1.0, 0.0], balance.dtype))
    (grads,) = jax.vmap(pullback)(cotangents)
    return logits, jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)

  return jax.jit(run)


@pytest.mark.parametrize(
  "dispatch,weighted_qkv,blocks",
  [("capacity", False, 2), ("capacity", True, 1), ("gather", True, 2)],
)
def test_dispatch_equals_dense_forward_and_gradients(dispatch, weighted_qkv, blocks):
  mom = dict(DEEP, num_blocks=blocks, weighted_qkv=weighted_qkv, dispatch="dense")
  dense, params = _model(**mom)
  routed = MoMGPT2(
    dense.config, dataclasses.replace(dense.mom, dispatch=dispatch, capacity_factor=0)
  )
  ids = _ids()
  probe = jnp.asarray(np.random.default_rng(5).normal(size=ids.shape + (64,)), jnp.float32)
  (_, ref), ref_grads = _probe_loss(dense, ids, probe)(params)
  ours, grads, task = _probe_grads(routed, ids, probe)(params)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads, ref_grads
  )
  # K=2, renormalised gate: the task loss alone (no balancing loss) reaches both routers
  task = task["decoder"]["routers"]
  for name in ("attn_0", "ffn_0"):
    assert float(jnp.abs(task[name]["input"]["kernel"]).max()) > 0, name


@pytest.mark.parametrize("dispatch,factor", [("dense", 0.0), ("capacity", 0.5)])
def test_no_token_sees_a_later_token(dispatch, factor):
  model, params = _model(**DEEP, dispatch=dispatch, capacity_factor=factor)
  ids, j = _ids(), 7
  changed = ids.at[0, j:].set((ids[0, j:] + 5) % 64)
  forward = jax.jit(lambda p, i: model(p, i))
  before, aux = forward(params, ids)
  after, _ = forward(params, changed)
  np.testing.assert_allclose(after[:, :j], before[:, :j], atol=1e-6, rtol=0)
  assert not np.allclose(after[0, j:], before[0, j:])
  if dispatch == "capacity":
    assert float(aux["router/dropped"]) > 0  # the capacity buffers overflowed and dropped slots


def test_exact_dispatch_gathers_the_chosen_modules_only_for_fewer_rows_than_modules():
  def routing(tokens, k):
    index = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (1, tokens, k))
    return Routing(
      jnp.zeros((1, tokens, 9)), index, jnp.ones((1, tokens, k)), jnp.ones((1, tokens))
    )

  assert isinstance(transport("exact", routing(3, 2), 8, 2.0), Gather)  # 6 rows < 8 modules
  assert isinstance(transport("exact", routing(4, 2), 8, 2.0), Dense)  # 8 rows: the pool once
  pool = {"w": jnp.arange(8.0)[:, None] * jnp.ones((8, 5))}
  gathered = Gather(routing(3, 2), 8).params(pool)["w"]
  np.testing.assert_array_equal(gathered[:, 0], [0, 1, 0, 1, 0, 1])  # row t*K + k: its module


def test_capacity_buffers_scale_with_k_not_with_the_pool():
  for modules in (4, 8, 16):
    r = Routing(
      jnp.zeros((2, 64, modules + 1)), jnp.zeros((2, 64, 1), jnp.int32), jnp.ones((2, 64, 1)),
      jnp.ones((2, 64)),
    )  # fmt: skip
    carrier = Capacity(r, modules, capacity_factor=2.0)
    assert carrier.tokens_NC.size == modules * -(-2 * 128 // modules)  # ~ factor * T * K rows


def _batch(ids):
  return {
    "decoder_input_tokens": ids,
    "decoder_target_tokens": jnp.roll(ids, -1, axis=1),
    "decoder_loss_weights": jnp.ones(ids.shape, jnp.float32),
  }


def test_pool_sharded_over_four_devices_gives_the_same_loss():
  from modjax.methods.mom.loss import mom_loss

  mom = dict(num_attn=4, num_ffn=4, top_k=1, rounds=2, router_dim=16, gate="softmax")
  model, params = _model(**mom)
  mesh = sharding.make_mesh(data=1, expert=4, devices=jax.devices()[:4])
  placed = jax.device_put(params, bank.shardings(model, params, mesh))
  kernel = placed["decoder"]["pools"]["ffn_0"]["ffn"]["wi"]["kernel"]
  assert kernel.sharding.spec[0] == "expert" and len(kernel.sharding.device_set) == 4
  assert kernel.addressable_shards[0].data.shape[0] == 1  # one module per device
  batch = _batch(_ids(batch=4, length=12))
  loss = jax.jit(lambda p: mom_loss(model)(p, {}, batch, None))
  (ref, weight, ref_aux), (ours, _, aux) = loss(params), loss(placed)
  np.testing.assert_allclose(ours / weight, ref / weight, atol=1e-5, rtol=0)
  for name in ref_aux:
    np.testing.assert_allclose(aux[name], ref_aux[name], atol=1e-5, rtol=0, err_msg=name)


# ---- the bank: layer map, pools, training -------------------------------------------------------


def test_vanilla_layers_map_into_pools_in_the_authors_order():
  cfg = MoMConfig(bottom_layers=2, num_blocks=1, num_attn=4, num_ffn=4, top_layers=2)
  expected = {"blocks": {"0": 0, "1": 1, "3": 6, "4": 7}, "attn": {0: (2, 3, 4, 5)}}
  assert {k: cfg.layer_map()[k] for k in expected} == expected  # gzhch's get_layer_map example
  wrapped = cfg.layer_map(4)
  assert wrapped["blocks"] == {"0": 0, "1": 1, "3": 2, "4": 3} and wrapped["attn"][0] == (
    2,
    3,
    0,
    1,
  )
  cfg = MoMConfig(bottom_layers=1, num_blocks=2, num_attn=2, num_ffn=3, anchor=True, top_layers=1)
  assert cfg.vanilla_depth == 10
  assert cfg.positions() == (
    ("block", "0"), ("mom", 0), ("block", "2"), ("mom", 1), ("block", "4"), ("block", "5"),
  )  # fmt: skip
  shapes = jax.eval_shape(GPT2(_gpt2_config(10)).init, jax.random.key(0))
  rng = np.random.default_rng(0)
  vanilla = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)
  params = mom_bank(vanilla, cfg, 10, jax.random.key(1))
  blocks, pools = vanilla["decoder"]["blocks"], params["decoder"]["pools"]
  np.testing.assert_array_equal(
    pools["attn_1"]["self_attn"]["query"]["kernel"][1], blocks["6"]["self_attn"]["query"]["kernel"]
  )
  np.testing.assert_array_equal(
    pools["ffn_1"]["ffn"]["wo"]["kernel"][2], blocks["7"]["ffn"]["wo"]["kernel"]
  )
  np.testing.assert_array_equal(
    pools["ffn_0"]["ffn_norm"]["scale"], jnp.stack([blocks[i]["ffn_norm"]["scale"] for i in "123"])
  )
  assert params["decoder"]["blocks"]["2"] is blocks["4"] and set(params["decoder"]["blocks"]) == {
    "0",
    "2",
    "4",
    "5",
  }
  model = MoMGPT2(_gpt2_config(10), cfg)
  axes = bank.param_axes(model, params)["decoder"]["pools"]["ffn_0"]["ffn"]["wi"]["kernel"]
  assert axes == jax.sharding.PartitionSpec("expert", "embed", "mlp")
  with pytest.raises(MoMError, match="top_k"):
    MoMConfig(num_attn=2, skip=False, top_k=3)


def _train_flags(workdir, *extra):
  small = {
    "train.num_steps": 3, "train.batch_size": 8, "train.log_every": 1, "data.targets_length": 16,
    "data.vocab_size": 200, "checkpoint.every_steps": 3, "mom.router_dim": 16,
  }  # fmt: skip
  settings = [f"--config.{k}={v}" for k, v in small.items()]
  return ["--config", f"{CONFIG}:tiny", f"--config.workdir={workdir}", *settings, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 3-step MoM run of configs/mom_gpt2.py:tiny from the command line (from scratch)."""
  workdir = tmp_path_factory.mktemp("mom") / "run"
  result = run_module("modjax.train", _train_flags(workdir), timeout=600, device_count=1)
  assert result.returncode == 0, result.stderr
  return workdir


def test_training_cli_writes_a_mom_bank_and_logs_router_statistics(trained):
  records = [json.loads(line) for line in (trained / "metrics" / "train.jsonl").open()]
  assert [r["step"] for r in records] == [1, 2, 3]
  names = ("balance_loss", "ce", "router/attn0_load1", "router/ffn0_skip_round1")
  for name in names + ("router/attn0_entropy", "router/dropped"):
    assert all(np.isfinite(r[name]) for r in records), name
  assert any(f.startswith("events") for f in os.listdir(trained / "tensorboard"))
  assert bank_io.load_bank(trained).step == 3
  model, params, _ = load_mom_bank(trained)
  assert model.mom.num_attn == 2 and model.config.n_layer == model.mom.vanilla_depth == 4
  assert params["decoder"]["pools"]["attn_0"]["self_attn"]["query"]["kernel"].shape[0] == 2
  logits, aux = jax.jit(lambda p, i: model(p, i))(params, _ids(vocab=200))
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(float(aux["balance_loss"]))


def test_a_bank_records_its_method_and_its_reader_runs_it(trained, tmp_path):
  """model.json names the method that wrote the bank; registry.bank_model gives the MoM bank
  its routed model, a bank with no method its architecture, and an unknown one an error."""
  stored = bank_io.load_bank(trained)
  assert stored.method == "mom"
  assert isinstance(registry.bank_model(stored.method, stored.model, stored.meta), MoMGPT2)
  assert registry.bank_model(None, stored.model, stored.meta) is stored.model
  copy = tmp_path / "copy"
  shutil.copytree(trained, copy)
  description = json.loads((copy / "model.json").read_text())
  (copy / "model.json").write_text(json.dumps(dict(description, method="elsewhere")))
  with pytest.raises(ConfigError, match="'elsewhere', which is not installed"):
    registry.bank_model(bank_io.load_bank(copy).method, stored.model, stored.meta)


def _config_module():
  spec = importlib.util.spec_from_file_location("modjax_configs_mom_gpt2", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CONFIG_DOC = _config_module().__doc__


def _mom_config(size="tiny", **values):
  cfg = _config_module().get_config(size)
  for key, value in values.items():
    set_key(cfg, key.replace("__", "."), value)
  return cfg


@pytest.mark.parametrize("size", ["tiny", "ddtp", "ddtp_authors"])
def test_mom_configs_build_locked_valid_and_with_the_papers_optimizer(size, tmp_path):
  if size != "tiny":  # its own small corpus: the shared one may not be beside a checkout
    corpus = tmp_path / "data"
    corpus.mkdir()
    for split in ("train", "validation"):
      with gzip.open(corpus / f"{split}.jsonl.gz", "wt") as f:
        f.write(json.dumps({"inputs": "a package description", "targets": "a synopsis"}) + "\n")
    size = f"{size},{corpus}"
  cfg = _mom_config(size, workdir=str(tmp_path))
  assert "python -m modjax.train --config configs/mom_gpt2.py" in CONFIG_DOC
  with pytest.raises(AttributeError):
    cfg.mom.no_such_key = 1
  validate_config(cfg)
  structure = structure_from_config(cfg.mom)
  assert structure.vanilla_depth == get_preset(cfg.model.preset).n_layer  # equal parameters
  assert (structure.anchor, structure.rounds) == (
    (True, 8) if size.startswith("ddtp_authors") else (False, 2 if size == "tiny" else 4)
  )
  o = cfg.optimizer
  assert (o.name, o.b1, o.b2, o.eps, o.weight_decay, o.schedule, o.grad_clip, o.learning_rate) == (
    "adamw",
    0.9,
    0.95,
    1e-5,
    0.1,
    "cosine",
    1.0,
    1e-3,
  )


def test_phase_two_starts_from_a_vanilla_gpt2_bank(trained, tmp_path):
  vanilla_dir = tmp_path / "vanilla"
  config = _gpt2_config(3, vocab_size=256, n_positions=64)
  bank_io.save_bank(vanilla_dir, GPT2(config), GPT2(config).init(jax.random.key(7)))
  (vanilla_dir / "vocab").mkdir()
  shutil.copy(trained / "vocab" / "spm.model", vanilla_dir / "vocab" / "spm.model")
  cfg = _mom_config(
    workdir=str(tmp_path / "mom"), train__num_steps=1, train__batch_size=8,
    data__targets_length=16, mom__router_dim=16, mom__num_ffn=1, mom__init_from=str(vanilla_dir),
    mesh__num_devices=1,  # one device, as the CLI run: the 8 fake CPU devices only cost time here
  )  # fmt: skip
  assert train_mom(cfg).last_step == 1
  assert cfg.data.vocab_path == ""  # the run read a copy of the config, this one is unchanged
  assert not (tmp_path / "mom" / "vocab").exists()  # the vanilla bank's vocabulary, none trained
  model, params, stored = load_mom_bank(tmp_path / "mom")
  assert model.config == config  # the vanilla model the pools stand for
  assert stored.meta["decoder/pools/attn_0"]["modules_from"] == [1, 2]
  assert stored.meta["decoder/pools/ffn_0"]["modules_from"] == [1]
  assert stored.meta["decoder/blocks/2"]["span"] == [0, 1]  # the top layer wraps round to 0
  assert params["decoder"]["pools"]["ffn_0"]["ffn"]["wi"]["kernel"].shape == (1, 32, 128)


def test_bad_mom_settings_are_one_line_errors(tmp_path):
  cases = [
    ("--config.mom.top_k=4", "config.mom.top_k=4 is invalid"),
    (f"--config.mom.init_from={tmp_path / 'absent'}", "holds no bank"),
  ]
  workdir = tmp_path / "run"
  runs = [
    (str(i), "modjax.train", _train_flags(workdir, flag)) for i, (flag, _) in enumerate(cases)
  ]
  results = run_cli_batch(runs, tmp_path, device_count=1, timeout=240)
  for i, (_, message) in enumerate(cases):
    result = results[str(i)]
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert TRACEBACK not in result.stderr and not workdir.exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
