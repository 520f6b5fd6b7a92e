"""Self-speculative decoding (modjax.decoding.speculative) and the multi-token decoder step it
verifies with.

References: the multi-token step against the teacher-forced forward pass; speculative output
against plain greedy decoding of the full plan (itself tested against Hugging Face ``generate``
in test_decode.py). Random tiny models repeat one token forever, so weights are multiplied by a
constant (sharper, more varied outputs) and the EOS is chosen from a first run without one.
"""

import dataclasses
import functools
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.core.model_config import GPT2Config, T5Config
from modjax.core.plan import Plan, PlanError, Slot
from modjax.decoding import generate, prepare, speculative_generate
from modjax.methods.modular.modules import add_modules
from modjax.models import GPT2, T5, bank
from modjax.nn.layers import NEG_INF, relative_position_bucket

NEW, K, BATCH, PROMPT = 16, 3, 8, 10
T5_CONFIG = dict(
  vocab_size=64,
  d_model=32,
  d_kv=8,
  d_ff=64,
  num_heads=4,
  num_layers=2,
  num_decoder_layers=4,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=12,
  dropout_rate=0.0,
  feed_forward_proj="gated-gelu",
)
GPT2_CONFIG = dict(vocab_size=64, n_positions=64, n_embd=32, n_layer=4, n_head=4)
GPT2_CONFIG.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
SCALE = {"t5": 3.0, "gpt2": 6.0}


@dataclasses.dataclass(frozen=True)
class Case:
  model: Any
  params: dict  # the bank: original blocks plus modules m2.*, m4.0
  ids: np.ndarray  # [B, P]: right-padded T5 encoder inputs, left-padded GPT-2 prompts
  mask: np.ndarray
  eos: int
  plain: Any  # plain greedy DecodeResult of the full plan

  @property
  def plan(self) -> Plan:
    return self.model.identity_plan()

  def run(self, draft_plan, ids=None, mask=None, **kw):
    kw = dict(max_new_tokens=NEW, eos_id=self.eos, draft_plan=draft_plan, draft_tokens=K) | kw
    ids, mask = (self.ids, self.mask) if ids is None else (ids, mask)
    return generate(self.model, self.params, self.plan, jnp.asarray(ids), jnp.asarray(mask), **kw)


def _inputs(is_t5: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, 64, size=(BATCH, PROMPT))
  mask = np.zeros_like(ids)
  for row, n in enumerate(rng.integers(3, PROMPT + 1, size=BATCH)):
    mask[row, :n] = 1
  if not is_t5:
    mask = mask[:, ::-1]  # left-padded prompts
  return np.where(mask == 1, ids, 0).astype(np.int32), mask.astype(np.int32)


def _choose_eos(tokens) -> int:
  """A frequent token whose first occurrence ends rows at different steps, some inside a
  drafted block (not its last token: the full-plan draft emits blocks of K+1 from token 1) while
  other rows never emit it."""
  counts = Counter(tokens[:, 2:12].ravel().tolist())
  for token, _ in counts.most_common():
    first = [list(row).index(token) for row in tokens.tolist() if token in row]
    mid_block = [e for e in first if e >= 2 and (e - 1) % (K + 1) != K]
    if mid_block and len(set(first)) > 1 and len(first) < len(tokens):
      return token
  raise AssertionError(f"no usable EOS among the generated tokens {tokens}")


@functools.cache
def case(kind: str) -> Case:
  is_t5 = kind == "t5"
  model = T5(T5Config(**T5_CONFIG)) if is_t5 else GPT2(GPT2Config(**GPT2_CONFIG))
  params = jax.tree.map(lambda x: x * SCALE[kind], model.init(jax.random.key(0)))
  params, _ = add_modules(model, params, {}, {"decoder": (2, 4)})  # each a copy of its first layer
  ids, mask = _inputs(is_t5)
  never = model.config.vocab_size  # no token: a first run without EOS
  first = generate(
    model, params, model.identity_plan(), ids, mask, max_new_tokens=NEW, eos_id=never
  )
  eos = _choose_eos(np.asarray(first.tokens))
  plain = generate(model, params, model.identity_plan(), ids, mask, max_new_tokens=NEW, eos_id=eos)
  return Case(model, params, ids, mask, eos, jax.tree.map(np.asarray, plain))


def _assert_same_as_plain(out, plain):
  np.testing.assert_array_equal(out.tokens, plain.tokens)
  np.testing.assert_array_equal(out.lengths, plain.lengths)
  # Summed log-probs: the sharpened models' logits move by ~5e-4 between a one-token step and a
  # block step (as between one-token steps and the forward pass), over up to 16 tokens.
  np.testing.assert_allclose(out.scores, plain.scores, rtol=0, atol=2e-3)


# ---- the multi-token decoder step ---------------------------------------------------------------
def _assert_close(got, want, what):
  """1e-5 relative to the largest logit, as the parity tests compare logits."""
  want = np.asarray(want)
  atol = 1e-5 * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=atol, err_msg=what)


@functools.cache
def _jitted(kind: str):
  """The model's forward pass and cached-decoding entry points, each jitted (plan and cache
  length static) and shared by the tests of the multi-token step: run eagerly, each of their
  many small operations would compile on its own, which takes far longer than one program."""
  m = case(kind).model
  return dict(
    forward=jax.jit(m.__call__, static_argnums=1),
    start=jax.jit(m.start_decoding, static_argnums=(1, 4)),
    tokens=jax.jit(m.decode_tokens, static_argnums=1),
    step=jax.jit(m.decode_step, static_argnums=1),
  )


def _teacher_forced(c: Case, tokens):
  """Logits [B, L, V] at every decoder position: T5's decoder input is the start token then
  ``tokens``; GPT-2 reads the prompt then ``tokens`` (the prompt's own logits are dropped)."""
  ids, mask = jnp.asarray(c.ids), jnp.asarray(c.mask)
  forward = _jitted("t5" if isinstance(c.model, T5) else "gpt2")["forward"]
  if isinstance(c.model, T5):
    start = jnp.full((BATCH, 1), c.model.config.decoder_start_token_id, jnp.int32)
    dec_in = jnp.concatenate([start, tokens], axis=1)
    return forward(c.params, c.plan, ids, dec_in, encoder_mask=mask)[0]
  seq = jnp.concatenate([ids, tokens], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(tokens)], axis=1)
  positions = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
  logits, _ = forward(c.params, c.plan, seq, attention_mask=full_mask, positions=positions)
  return logits[:, PROMPT - 1 :]


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_decode_tokens_equal_teacher_forced_logits_at_per_row_positions(kind):
  """Scores 8 tokens at once, then 3 tokens per row from a different position per row: the
  logits equal the teacher-forced ones. Unscaled weights here: the sharpened models of the
  other tests are too ill-conditioned for 1e-5 even between one-token steps and the forward."""
  c = dataclasses.replace(case(kind), params=case(kind).model.init(jax.random.key(0)))
  m, rng = _jitted(kind), np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(2, 64, size=(BATCH, 14)), jnp.int32)
  want = _teacher_forced(c, tokens)  # want[:, t]: logits after t tokens
  cache, first, index = m["start"](c.params, c.plan, c.ids, c.mask, 20)
  _assert_close(first, want[:, 0], "start")
  logits, cache = m["tokens"](c.params, c.plan, cache, tokens[:, :8], index)
  _assert_close(logits, want[:, 1:9], "8 tokens at one position")
  start_B = jnp.asarray(rng.integers(1, 8, size=BATCH), jnp.int32)  # tokens already cached
  assert len(set(start_B.tolist())) > 2
  at = start_B[:, None] + jnp.arange(3)
  logits, _ = m["tokens"](c.params, c.plan, cache, _take(tokens, at), index + start_B)
  _assert_close(logits, _take(want, at + 1), "3 tokens at per-row positions")
  one, _ = m["step"](c.params, c.plan, cache, _take(tokens, at)[:, 0], index + start_B)
  _assert_close(one, _take(want, at + 1)[:, 0], "one token at per-row positions")


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_entries_after_a_rows_position_are_never_read(kind):
  """Rolling a row back is moving its position: what a row's cache holds after the queried
  positions (rejected drafts) must not reach any logit. Junk tokens written there first, or
  large random keys/values, leave the logits bit-identical."""
  c, rng = case(kind), np.random.default_rng(2)
  m = _jitted(kind)
  tokens = jnp.asarray(rng.integers(2, 64, size=(BATCH, 8)), jnp.int32)
  cache, _, index = m["start"](c.params, c.plan, c.ids, c.mask, 20)
  _, cache = m["tokens"](c.params, c.plan, cache, tokens, index)
  start_B = index + jnp.asarray(rng.integers(1, 6, size=BATCH), jnp.int32)
  block = jnp.asarray(rng.integers(2, 64, size=(BATCH, 3)), jnp.int32)
  clean, _ = m["tokens"](c.params, c.plan, cache, block, start_B)
  junk = jnp.asarray(rng.integers(2, 64, size=(BATCH, 6)), jnp.int32)
  _, junked = m["tokens"](c.params, c.plan, cache, junk, start_B)
  after_junk, _ = m["tokens"](c.params, c.plan, junked, block, start_B)
  np.testing.assert_array_equal(after_junk, clean)
  noisy, _ = m["tokens"](c.params, c.plan, _poison_after(cache, start_B), block, start_B)
  np.testing.assert_array_equal(noisy, clean)


def _take(x, at_BN):
  """x[b, at[b, j]] for [B, L, ...] x."""
  return jnp.take_along_axis(x, at_BN.reshape(at_BN.shape + (1,) * (x.ndim - 2)), axis=1)


def _poison_after(cache, position_B):
  """The cache with every self-attention entry at or after ``position_B`` replaced by large
  random values (keys are stored [B, H, K, T], values [B, H, T, K])."""
  layers = []
  for i, layer in enumerate(cache["self"]):
    k_later = jnp.arange(layer["k"].shape[-1]) >= position_B[:, None]
    key = jax.random.key(100 + i)
    noise_k = 30.0 * jax.random.normal(key, layer["k"].shape, layer["k"].dtype)
    noise_v = 30.0 * jax.random.normal(jax.random.fold_in(key, 1), layer["v"].shape)
    layers.append(
      {
        "k": jnp.where(k_later[:, None, None, :], noise_k, layer["k"]),
        "v": jnp.where(k_later[:, None, :, None], noise_v.astype(layer["v"].dtype), layer["v"]),
      }
    )
  return dict(cache, self=tuple(layers))


# ---- speculative generation ---------------------------------------------------------------------
def _draft(kind: str, name: str) -> Plan:
  """Draft plans over the same bank: a subset of the full plan's layers, the modules standing
  for pairs of layers, the full plan itself, and a draft that is always wrong."""
  if name == "subset":
    return Plan(decoder=(Slot("0"), Slot("3")))
  if name == "modules":
    return Plan(decoder=(Slot("m2.0"), Slot("m2.1")))
  if name == "full":
    return case(kind).plan
  raise ValueError(name)


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
@pytest.mark.parametrize("draft", ["subset", "modules"])
def test_output_equals_plain_greedy_and_rows_accept_different_lengths(kind, draft):
  c = case(kind)
  out = c.run(_draft(kind, draft))
  _assert_same_as_plain(out, c.plain)
  stats = jax.tree.map(np.asarray, out.stats)
  assert 0 < stats.accepted.sum() < stats.drafted.sum()
  ran = stats.rounds > 0  # a row ending at its first token never drafts
  per_round = stats.accepted[ran] / stats.rounds[ran]
  assert len(set(per_round.tolist())) > 2, per_round  # rows advance by different amounts
  np.testing.assert_array_equal(stats.drafted, K * stats.rounds)
  # every round emits the accepted drafts plus one token, cut at EOS or max_new_tokens
  assert np.all(stats.rounds + stats.accepted >= out.lengths - 1)


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_full_plan_draft_accepts_everything_with_eos_and_the_limit_inside_blocks(kind):
  """Drafting with the full plan itself, every draft is accepted and each round emits K+1
  tokens from token 1 on: rows ending on EOS in the middle of a block (the fixture picks such an
  EOS) and the last block cut by max_new_tokens (NEW - 1 is not a multiple of K + 1)."""
  c = case(kind)
  assert (NEW - 1) % (K + 1) != 0
  eos_rows = [e for e in c.plain.lengths if e < NEW and (e - 2) % (K + 1) != K]
  assert eos_rows and (c.plain.lengths == NEW).any()
  out = c.run(_draft(kind, "full"))
  _assert_same_as_plain(out, c.plain)
  assert out.stats.acceptance_rate == 1.0
  np.testing.assert_array_equal(out.stats.rounds, -(-(c.plain.lengths - 1) // (K + 1)))


def _always_wrong(c: Case):
  """(bank, draft plan): one block whose FFN output is a large positive multiple of the
  embedding of a token the full plan never emits, whatever its input (T5's gated FFN with equal
  branches gives sum_i gelu(x_i) x_i >= 0 times each row of ``wo``; GPT-2's FFN output bias),
  so the draft always proposes that token."""
  emitted = set(np.asarray(c.plain.tokens).ravel().tolist())
  embedding = np.asarray(c.params["token_embedding"]["embedding"])
  for token in (t for t in range(2, embedding.shape[0]) if t not in emitted):
    block = jax.tree.map(jnp.asarray, c.params["decoder"]["blocks"]["0"])
    ffn = dict(block["ffn"])
    direction = 1e3 * jnp.asarray(embedding[token])
    if isinstance(c.model, T5):
      ffn["wi_1"] = ffn["wi_0"]
      ffn["wo"] = {"kernel": jnp.broadcast_to(direction, ffn["wo"]["kernel"].shape)}
    else:
      ffn["wo"] = {"kernel": jnp.zeros_like(ffn["wo"]["kernel"]), "bias": direction}
    params = bank.with_entry(c.params, "decoder", "blocks", "wrong", dict(block, ffn=ffn))
    plan = Plan(encoder=c.plan.encoder, decoder=(Slot("wrong"),))
    alone = generate(c.model, params, plan, c.ids, c.mask, max_new_tokens=NEW, eos_id=c.eos)
    if np.all(np.asarray(alone.tokens) == token):
      return params, plan
  raise AssertionError("no token gives a draft that always proposes it")


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_a_draft_that_is_always_wrong_still_gives_plain_greedy_output(kind):
  c = case(kind)
  params, draft_plan = _always_wrong(c)
  out = dataclasses.replace(c, params=params).run(draft_plan)
  _assert_same_as_plain(out, c.plain)
  assert int(np.sum(out.stats.accepted)) == 0
  np.testing.assert_array_equal(out.stats.rounds, c.plain.lengths - 1)  # one token per round


@dataclasses.dataclass(frozen=True)
class _Poisoning:
  """The model, except that each multi-token step leaves large random values in its cache after
  the positions it wrote: what rejected drafts would leave there, at their worst."""

  inner: Any

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def decode_tokens(self, params, plan, cache, token_ids_BN, index):
    logits, cache = self.inner.decode_tokens(params, plan, cache, token_ids_BN, index)
    end = jnp.broadcast_to(index + token_ids_BN.shape[1], token_ids_BN.shape[:1])
    return logits, _poison_after(cache, end)


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_junk_after_the_accepted_length_changes_nothing(kind):
  """Not the tokens, and not what the draft proposes: a draft step reading an entry it never
  wrote (a round starting without the re-feed it needed) would read junk and accept less."""
  c = case(kind)
  poisoning = dataclasses.replace(c, model=_Poisoning(c.model))
  poisoned = poisoning.run(_draft(kind, "subset"))
  _assert_same_as_plain(poisoned, c.plain)
  clean = c.run(_draft(kind, "subset"))
  np.testing.assert_array_equal(poisoned.stats.accepted, clean.stats.accepted)
  np.testing.assert_array_equal(poisoned.stats.rounds, clean.stats.rounds)


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_batch_of_one_equals_plain_greedy_row_by_row(kind):
  c = case(kind)
  for row in range(0, BATCH, 3):
    one = c.run(_draft(kind, "subset"), c.ids[row : row + 1], c.mask[row : row + 1])
    _assert_same_as_plain(one, jax.tree.map(lambda x, r=row: x[r : r + 1], c.plain))


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_without_scores_greedy_and_speculative_give_the_same_tokens(kind):
  """``scores=False`` skips the log-softmax: the same tokens and statistics, no scores; at
  batch 1 too, where a row's positions are one scalar."""
  c = case(kind)
  with_scores = c.run(_draft(kind, "subset"))
  out = c.run(_draft(kind, "subset"), scores=False)
  assert out.scores is None
  np.testing.assert_array_equal(out.tokens, c.plain.tokens)
  np.testing.assert_array_equal(out.stats.accepted, with_scores.stats.accepted)
  kw = dict(max_new_tokens=NEW, eos_id=c.eos, scores=False)
  greedy = generate(c.model, c.params, c.plan, c.ids, c.mask, **kw)
  assert greedy.scores is None
  np.testing.assert_array_equal(greedy.tokens, c.plain.tokens)
  one = c.run(_draft(kind, "subset"), c.ids[:1], c.mask[:1], scores=False)
  np.testing.assert_array_equal(one.tokens, c.plain.tokens[:1])


def test_t5_self_bias_table_holds_the_bias_a_step_computes_from_positions():
  """The table built once per generation: at offset ``T - 1 - q + t`` the relative-position
  bias of key t for query q plus the causal mask, bit for bit."""
  c = case("t5")
  m, length, cfg = c.model, 20, case("t5").model.config
  table = np.asarray(m.self_bias_table(c.params, length))
  assert table.shape == (cfg.num_heads, 2 * length - 1)
  by_bucket_NH = c.params["decoder"]["relpos_bias"]["embedding"]
  keys = jnp.arange(length)
  for q in (0, 1, 7, length - 1):
    buckets = relative_position_bucket(
      keys - q, False, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    want = np.asarray(by_bucket_NH[buckets].T + jnp.where(keys <= q, 0.0, NEG_INF))
    np.testing.assert_array_equal(table[:, length - 1 - q : 2 * length - 1 - q], want)


def test_t5_draft_with_its_own_encoder_and_prepared_weights():
  c = case("t5")
  draft = Plan(encoder=(Slot("1"),), decoder=(Slot("0"), Slot("3")))
  for new in (NEW, 1):  # 1: the first token alone, no round
    plain = generate(c.model, c.params, c.plan, c.ids, c.mask, max_new_tokens=new, eos_id=c.eos)
    out = speculative_generate(
      c.model,
      c.params,
      c.plan,
      c.ids,
      c.mask,
      draft_plan=draft,
      draft_tokens=2,
      max_new_tokens=new,
      eos_id=c.eos,
      prepared=prepare(c.model, c.params),
      draft_encoder=True,
    )
    _assert_same_as_plain(out, plain)


def test_bad_arguments_raise_clear_errors():
  c = case("gpt2")
  draft = _draft("gpt2", "subset")
  with pytest.raises(ValueError, match="beam search stays plain"):
    c.run(draft, num_beams=2)
  with pytest.raises(ValueError, match="draft_tokens must be an integer >= 1, got 0"):
    c.run(draft, draft_tokens=0)
  with pytest.raises(PlanError, match="decoder slot 1 names block 'nope'"):
    c.run(Plan(decoder=(Slot("0"), Slot("nope"))))
  too_many = c.model.config.n_positions - PROMPT - K
  with pytest.raises(ValueError, match=r"\+ a drafted block \(4\) exceed n_positions=64"):
    c.run(draft, max_new_tokens=too_many)
  with pytest.raises(PlanError, match="decoder slot 0 names block 'nope'"):
    case("t5").run(Plan(decoder=(Slot("nope"),)))
