"""Logits and intermediates of modjax vs transformers (PyTorch) on randomly initialised models.

Tolerances: ``_assert_close`` uses ``atol = 1e-4 * max(1, max|ref|)`` (T5 logits are O(1) to O(10)
with unit-variance embeddings); GPT-2's logits are O(0.1) and use plain ``atol=1e-4`` through the
same helper (the scale is then 1). Attention probabilities use ``atol=1e-5``.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import copy  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import TINY_T5  # noqa: E402

from modjax.core.model_config import T5Config  # noqa: E402
from modjax.core.plan import Plan, Slot  # noqa: E402
from modjax.models import GPT2, T5, architecture_for  # noqa: E402
from modjax.store.hf import (  # noqa: E402
  HFInteropError,
  export_checkpoint,
  import_checkpoint,
)


@functools.partial(jax.jit, static_argnums=(0, 2), static_argnames=("collect",))
def _apply(model, params, plan, *inputs, collect=False, **kwargs):
  return model(params, plan, *inputs, collect=collect, **kwargs)


def _assert_close(ours, ref, rel=1e-4):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * max(1.0, float(np.abs(ref).max())))


def _t5_batch(vocab, batch=3, enc_len=20, dec_len=15, enc_lengths=(20, 13, 7), seed=0):
  """Encoder ids right-padded to ``enc_lengths`` (pad id 0) and unpadded decoder ids."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(enc_len)[None, :] < np.asarray(enc_lengths)[:, None]).astype(np.int32)
  enc = np.where(mask, rng.integers(2, vocab, (batch, enc_len)), 0).astype(np.int32)
  dec = rng.integers(2, vocab, (batch, dec_len)).astype(np.int32)
  dec[:, 0] = 0  # decoder start token
  return enc, mask, dec


def _hf_t5(hf_model, enc, mask, dec, **kwargs):
  with torch.no_grad():
    return hf_model(
      input_ids=torch.from_numpy(enc).long(),
      attention_mask=torch.from_numpy(mask).long(),
      decoder_input_ids=torch.from_numpy(dec).long(),
      use_cache=False,
      **kwargs,
    )


def _ours_t5(config, params, enc, mask, dec, plan=None, collect=False):
  model = T5(config)
  return _apply(
    model,
    params,
    plan or model.identity_plan(),
    jnp.asarray(enc),
    jnp.asarray(dec),
    encoder_mask=jnp.asarray(mask),
    collect=collect,
  )


def _gpt2_batch(vocab, batch=3, length=20, lengths=(20, 14, 5), seed=1):
  rng = np.random.default_rng(seed)
  mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(0, vocab, (batch, length)), 0).astype(np.int32)
  return ids, mask


def _hf_gpt2(hf_model, ids, mask, **kwargs):
  with torch.no_grad():
    return hf_model(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      use_cache=False,
      **kwargs,
    )


def _ours_gpt2(config, params, ids, mask, plan=None, collect=False):
  model = GPT2(config)
  return _apply(
    model,
    params,
    plan or model.identity_plan(),
    jnp.asarray(ids),
    attention_mask=jnp.asarray(mask),
    collect=collect,
  )


def _rms_norm(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * np.asarray(scale)


# ---- logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kind, gated, scaled",
  [("t5_v1_0", False, True), ("t5_v1_1", True, False), ("t5_gelu", False, True)],
)
def test_t5_logits_match_hf_with_encoder_padding(hf_checkpoint, kind, gated, scaled):
  directory, hf_model = hf_checkpoint(kind)
  config, params = import_checkpoint(directory)
  assert config.is_gated == gated and config.scale_decoder_outputs == scaled
  assert config.activation == hf_model.config.dense_act_fn
  assert config.tie_word_embeddings
  # 20 encoder tokens > relative_attention_max_distance=12: long-distance buckets are used.
  enc, mask, dec = _t5_batch(config.vocab_size)
  ref = _hf_t5(hf_model, enc, mask, dec).logits.numpy()
  ours, inter = _ours_t5(config, params, enc, mask, dec)
  assert inter is None and ours.dtype == jnp.float32
  _assert_close(ours, ref)  # every decoder position: padding is on the encoder side only


def test_t5_untied_head_export_matches_hf(tmp_path):
  config = T5Config(
    **TINY_T5,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
  )
  params = T5(config).init(jax.random.key(1))
  export_checkpoint(config, params, str(tmp_path / "untied"))
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "untied").eval()
  assert not hf_model.config.scale_decoder_outputs
  head, shared = hf_model.lm_head.weight.detach().numpy(), hf_model.shared.weight.detach().numpy()
  assert not np.array_equal(head, shared), "HF tied the head: the untied lm_head was dropped"
  np.testing.assert_array_equal(head, np.asarray(params["lm_head"]["kernel"]).T)
  enc, mask, dec = _t5_batch(config.vocab_size, seed=2)
  ref = _hf_t5(hf_model, enc, mask, dec).logits.numpy()
  ours, _ = _ours_t5(config, params, enc, mask, dec)
  _assert_close(ours, ref)


@pytest.mark.parametrize("ffn", ["gelu", "gated-gelu"])
def test_t5_gelu_export_matches_hf(tmp_path, ffn):
  """HF reads modjax's exported activation back as the same function (erf GELU for 'gelu', tanh
  for 'gated-gelu'), and modjax imports its own export unchanged."""
  config = T5Config(**TINY_T5, feed_forward_proj=ffn)
  params = T5(config).init(jax.random.key(3))
  export_checkpoint(config, params, str(tmp_path / ffn))
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / ffn).eval()
  assert hf_model.config.dense_act_fn == {"gelu": "gelu", "gated-gelu": "gelu_new"}[ffn]
  assert import_checkpoint(str(tmp_path / ffn))[0] == config
  enc, mask, dec = _t5_batch(config.vocab_size, seed=3)
  ref = _hf_t5(hf_model, enc, mask, dec).logits.numpy()
  ours, _ = _ours_t5(config, params, enc, mask, dec)
  _assert_close(ours, ref)


def test_t5_import_rejects_a_dense_act_fn_it_cannot_run(hf_checkpoint, tmp_path):
  """transformers lets a stored dense_act_fn override feed_forward_proj; modjax cannot, so it
  refuses rather than silently running another activation."""
  import json
  import shutil

  directory = shutil.copytree(hf_checkpoint("t5_gelu")[0], tmp_path / "ckpt")
  raw = json.load(open(directory / "config.json"))
  raw["dense_act_fn"] = "gelu_new"
  json.dump(raw, open(directory / "config.json", "w"))
  with pytest.raises(HFInteropError, match="dense_act_fn='gelu_new'.*feed_forward_proj='gelu'"):
    import_checkpoint(str(directory))


def test_gpt2_logits_match_hf_with_right_padding(hf_checkpoint):
  directory, hf_model = hf_checkpoint("gpt2")
  config, params = import_checkpoint(directory)
  ids, mask = _gpt2_batch(config.vocab_size)
  ref = _hf_gpt2(hf_model, ids, mask).logits.numpy()
  ours, _ = _ours_gpt2(config, params, ids, mask)
  real = mask.astype(bool)  # padded positions are garbage in both; compare real tokens only
  _assert_close(np.asarray(ours)[real], ref[real])


def test_t5_small_shape_logits_match_hf(tmp_path):
  torch.manual_seed(0)
  hf_config = transformers.T5Config(  # t5-small shapes, v1.0 (ReLU, tied, rescaled head)
    vocab_size=32128,
    d_model=512,
    d_ff=2048,
    num_heads=8,
    d_kv=64,
    num_layers=6,
    num_decoder_layers=6,
    dropout_rate=0.0,
    feed_forward_proj="relu",
  )
  hf_model = transformers.T5ForConditionalGeneration(hf_config).eval()
  hf_model.save_pretrained(tmp_path)
  config, params = import_checkpoint(str(tmp_path))
  assert (config.d_model, config.num_layers, config.vocab_size) == (512, 6, 32128)
  enc, mask, dec = _t5_batch(config.vocab_size, batch=2, enc_len=12, dec_len=6, enc_lengths=(12, 8))
  ref = _hf_t5(hf_model, enc, mask, dec).logits.numpy()
  ours, _ = _ours_t5(config, params, enc, mask, dec)
  _assert_close(ours, ref)


@pytest.mark.parametrize("kind", ["t5_v1_1", "gpt2"])
def test_bfloat16_compute_is_close_to_float32(hf_checkpoint, kind):
  directory, _ = hf_checkpoint(kind)
  config32, params = import_checkpoint(directory)
  config16, params16 = import_checkpoint(directory, dtype="bfloat16")
  assert config16.dtype == "bfloat16" and config16.param_dtype == "float32"
  if kind == "gpt2":
    ids, mask = _gpt2_batch(config32.vocab_size)
    ref, _ = _ours_gpt2(config32, params, ids, mask)
    low, _ = _ours_gpt2(config16, params16, ids, mask)
    real = mask.astype(bool)
    ref, low = np.asarray(ref)[real], np.asarray(low)[real]
  else:
    enc, mask, dec = _t5_batch(config32.vocab_size)
    ref, _ = _ours_t5(config32, params, enc, mask, dec)
    low, _ = _ours_t5(config16, params16, enc, mask, dec)
    ref, low = np.asarray(ref), np.asarray(low)
  assert low.dtype == np.float32 and np.isfinite(low).all()
  scale = np.abs(ref).max()
  assert not np.array_equal(low, ref), "bfloat16 compute gave bit-identical float32 results"
  np.testing.assert_allclose(low, ref, rtol=0, atol=0.1 * scale)
  assert np.mean(low.argmax(-1) == ref.argmax(-1)) >= 0.8


# ---- intermediates --------------------------------------------------------------------------


def test_t5_collect_matches_hf_hidden_states_and_attentions(hf_checkpoint):
  directory, _ = hf_checkpoint("t5_v1_0")
  config, params = import_checkpoint(directory)
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(
    directory, attn_implementation="eager"
  ).eval()
  enc, mask, dec = _t5_batch(config.vocab_size, seed=3)
  b, s, t = enc.shape[0], enc.shape[1], dec.shape[1]
  h, d = config.num_heads, config.d_model
  ref = _hf_t5(hf_model, enc, mask, dec, output_hidden_states=True, output_attentions=True)
  logits, inter = _ours_t5(config, params, enc, mask, dec, collect=True)
  _assert_close(logits, ref.logits.numpy())

  encoder, decoder = inter["encoder"], inter["decoder"]
  assert set(encoder) == {"hidden", "self_attn"}
  assert set(decoder) == {"hidden", "self_attn", "cross_attn"}
  assert len(encoder["hidden"]) == len(encoder["self_attn"]) == config.num_layers
  n_dec = config.num_decoder_layers
  assert len(decoder["hidden"]) == len(decoder["self_attn"]) == len(decoder["cross_attn"]) == n_dec
  for x in encoder["hidden"]:
    assert x.shape == (b, s, d)
  for x in decoder["hidden"]:
    assert x.shape == (b, t, d)
  shapes = [(encoder["self_attn"], (b, h, s, s)), (decoder["self_attn"], (b, h, t, t))]
  shapes.append((decoder["cross_attn"], (b, h, t, s)))
  for probs, shape in shapes:
    for p in probs:
      assert p.shape == shape
      np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-5)

  # The last decoder hidden state, through the final norm and the (rescaled) tied head, gives
  # the logits.
  x = _rms_norm(decoder["hidden"][-1], params["decoder"]["final_norm"]["scale"], 1e-6)
  x = x * d**-0.5
  _assert_close(logits, x @ np.asarray(params["token_embedding"]["embedding"], np.float64).T)

  # HF: hidden_states[0] is the embedding output, [i + 1] is block i's output, and the last entry
  # has the stack's final norm applied.
  for ours, theirs, name in (
    (encoder, ref.encoder_hidden_states, "encoder"),
    (decoder, ref.decoder_hidden_states, "decoder"),
  ):
    assert len(theirs) == len(ours["hidden"]) + 1
    for i in range(len(ours["hidden"]) - 1):
      _assert_close(ours["hidden"][i], theirs[i + 1].numpy())
    final = _rms_norm(ours["hidden"][-1], params[name]["final_norm"]["scale"], 1e-6)
    _assert_close(final, theirs[-1].numpy())
  for ours, theirs in (
    (encoder["self_attn"], ref.encoder_attentions),
    (decoder["self_attn"], ref.decoder_attentions),
    (decoder["cross_attn"], ref.cross_attentions),
  ):
    assert len(ours) == len(theirs)
    for p, q in zip(ours, theirs, strict=True):
      np.testing.assert_allclose(np.asarray(p), q.numpy(), rtol=0, atol=1e-5)
  # Padded encoder keys get no attention.
  pad = ~mask.astype(bool)
  for p in decoder["cross_attn"]:
    assert not np.any(np.asarray(p) * pad[:, None, None, :])


def test_gpt2_collect_matches_hf(hf_checkpoint):
  directory, _ = hf_checkpoint("gpt2")
  config, params = import_checkpoint(directory)
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(
    directory, attn_implementation="eager"
  ).eval()
  ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  ref = _hf_gpt2(hf_model, ids, mask, output_hidden_states=True, output_attentions=True)
  logits, inter = _ours_gpt2(config, params, ids, mask, collect=True)
  assert set(inter) == {"decoder"} and set(inter["decoder"]) == {"hidden", "self_attn"}
  hidden, attn = inter["decoder"]["hidden"], inter["decoder"]["self_attn"]
  assert len(hidden) == len(attn) == config.n_layer
  assert len(ref.hidden_states) == config.n_layer + 1
  for i in range(config.n_layer - 1):
    _assert_close(hidden[i], ref.hidden_states[i + 1].numpy())
  for p, q in zip(attn, ref.attentions, strict=True):
    assert p.shape == (2, config.n_head, 12, 12)
    np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p), q.numpy(), rtol=0, atol=1e-5)
  # Layer norm of the last hidden state reproduces HF's last entry and, through the tied head,
  # the logits.
  x = np.asarray(hidden[-1], np.float64)
  ln = params["decoder"]["final_norm"]
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  x = x * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
  _assert_close(x, ref.hidden_states[-1].numpy())
  _assert_close(logits, x @ np.asarray(params["token_embedding"]["embedding"], np.float64).T)


# ---- plans ----------------------------------------------------------------------------------


def _slots(*names):
  return tuple(Slot(n) for n in names)


@pytest.mark.parametrize(
  "encoder, decoder",
  [(("0", "1", "1", "0"), ("0", "2", "2")), (("0",), ("0", "2"))],
  ids=["repeat", "subset"],
)
def test_t5_plan_matches_hf_with_rearranged_blocks(hf_checkpoint, encoder, decoder):
  # HF computes T5's position bias in its first block and reuses it, so plans start at block 0.
  directory, hf_model = hf_checkpoint("t5_v1_0")
  config, params = import_checkpoint(directory)
  plan = Plan(encoder=_slots(*encoder), decoder=_slots(*decoder)).validate(params, T5.stacks)
  hf_model = copy.deepcopy(hf_model)
  for stack, names in ((hf_model.encoder, encoder), (hf_model.decoder, decoder)):
    stack.block = torch.nn.ModuleList([stack.block[int(n)] for n in names])
  enc, mask, dec = _t5_batch(config.vocab_size, seed=5)
  ref = _hf_t5(hf_model, enc, mask, dec).logits.numpy()
  ours, inter = _ours_t5(config, params, enc, mask, dec, plan=plan, collect=True)
  assert len(inter["encoder"]["hidden"]) == len(encoder)
  assert len(inter["decoder"]["hidden"]) == len(decoder)
  _assert_close(ours, ref)
  plain, _ = _ours_t5(config, params, enc, mask, dec)
  assert not np.allclose(plain, ours, atol=1e-3), "the plan had no effect"


def test_gpt2_plan_matches_hf_with_rearranged_blocks(hf_checkpoint):
  directory, hf_model = hf_checkpoint("gpt2")
  config, params = import_checkpoint(directory)
  names = ("2", "0", "0")
  plan = Plan(decoder=_slots(*names)).validate(params, GPT2.stacks)
  hf_model = copy.deepcopy(hf_model)
  hf_model.transformer.h = torch.nn.ModuleList([hf_model.transformer.h[int(n)] for n in names])
  ids, mask = _gpt2_batch(config.vocab_size)
  ref = _hf_gpt2(hf_model, ids, mask).logits.numpy()
  ours, _ = _ours_gpt2(config, params, ids, mask, plan=plan)
  real = mask.astype(bool)
  _assert_close(np.asarray(ours)[real], ref[real])


def _with_equal_ffns(params, source="0"):
  """T5 params whose decoder blocks all hold copies of block ``source``'s FFN, plus a shared
  entry ``ffns["shared"]`` equal to it."""
  params = jax.tree.map(jnp.asarray, params)
  decoder = params["decoder"]
  ffn = decoder["blocks"][source]["ffn"]
  blocks = {
    name: {**block, "ffn": jax.tree.map(jnp.copy, ffn)} for name, block in decoder["blocks"].items()
  }
  return {**params, "decoder": {**decoder, "blocks": blocks, "ffns": {"shared": ffn}}}


def test_shared_ffn_plan_matches_equal_ffns_and_sums_gradients(hf_checkpoint):
  directory, _ = hf_checkpoint("t5_v1_0")
  config, original = import_checkpoint(directory)
  model = T5(config)
  params = _with_equal_ffns(original)
  plain = model.identity_plan()
  shared = Plan(
    encoder=plain.encoder, decoder=tuple(Slot(s.block, ffn="shared") for s in plain.decoder)
  ).validate(params, model.stacks)
  enc, mask, dec = _t5_batch(config.vocab_size, seed=6)
  weights = jnp.asarray(np.random.default_rng(7).normal(size=(*dec.shape, config.vocab_size)))

  def loss(p, plan):
    logits, _ = model(p, plan, jnp.asarray(enc), jnp.asarray(dec), encoder_mask=jnp.asarray(mask))
    return jnp.sum(logits * weights), logits

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  g_plain, logits_plain = grad_fn(params, plain)
  g_shared, logits_shared = grad_fn(params, shared)
  _assert_close(logits_shared, logits_plain, rel=1e-5)
  different, _ = _ours_t5(config, original, enc, mask, dec)
  assert not np.allclose(different, logits_plain, atol=1e-3), "equalising FFNs changed nothing"

  # Tied: the shared entry's gradient is the sum of the per-position FFN gradients of the plain
  # plan; the blocks' own FFNs are unused under the shared plan and get zero gradient.
  per_slot = [g_plain["decoder"]["blocks"][s.block]["ffn"] for s in plain.decoder]
  summed = jax.tree.map(lambda *g: sum(g), *per_slot)
  jax.tree.map(
    lambda a, b: _assert_close(a, b, rel=1e-4), g_shared["decoder"]["ffns"]["shared"], summed
  )
  for s in plain.decoder:
    for leaf in jax.tree.leaves(g_shared["decoder"]["blocks"][s.block]["ffn"]):
      assert not np.any(np.asarray(leaf))
  assert not np.any([np.any(np.asarray(x)) for x in jax.tree.leaves(g_plain["decoder"]["ffns"])])
  # Everything else (attention, norms, embeddings, encoder) gets the same gradient either way.
  jax.tree.map(lambda a, b: _assert_close(a, b, rel=1e-4), g_shared["encoder"], g_plain["encoder"])


def test_architecture_for_picks_the_model():
  assert isinstance(architecture_for(T5Config(**TINY_T5)), T5)
  with pytest.raises(TypeError):
    architecture_for(object())
