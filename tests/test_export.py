"""Exports of a (bank, plan), each checked against a reference nobody here wrote: transformers'
PyTorch models load the Hugging Face export and compute modjax's logits and greedy generations;
``jax.export`` graphs reloaded in a fresh process compute what the jitted functions compute;
Orbax restores the subset bank; the command line refuses bad input before writing anything."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_model

from modjax.core.plan import Plan, PlanError, Slot
from modjax.decoding import generate
from modjax.models import T5, architecture_for, bank
from modjax.store import bank_io, export
from modjax.store.hf import import_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 8  # generated tokens


def _mean_ffn(params, stack, a, b):
  blocks = params[stack]["blocks"]
  return jax.tree.map(lambda x, y: (x + y) / 2, blocks[a]["ffn"], blocks[b]["ffn"])


def _hf_bank(tmp_path_factory, kind, **overrides):
  """A tiny HF model imported as a bank, plus a shared FFN entry unlike any block's own."""
  directory = tmp_path_factory.mktemp(f"src_{kind}")
  build_hf_model(kind, **overrides).save_pretrained(directory)
  config, params = import_checkpoint(str(directory))
  model = architecture_for(config)
  shared = _mean_ffn(params, "decoder", "0", "2")
  return model, bank.with_entry(params, "decoder", "ffns", "shared", shared, model=model)


@pytest.fixture(scope="module")
def t5_deep(tmp_path_factory):
  """T5 v1.1 with 4 encoder and 6 decoder layers (transformers 5.x ties its head)."""
  return _hf_bank(tmp_path_factory, "t5_v1_1", num_layers=4, num_decoder_layers=6)


@pytest.fixture(scope="module")
def gpt2_bank(tmp_path_factory):
  return _hf_bank(tmp_path_factory, "gpt2", n_layer=4)


# Encoder: 3 of 4 layers reordered; decoder: 3 of 6 reordered, two slots sharing one FFN.
T5_PLAN = Plan(
  encoder=(Slot("2"), Slot("0"), Slot("3")),
  decoder=(Slot("5"), Slot("1", ffn="shared"), Slot("3", ffn="shared")),
)
GPT2_PLAN = Plan(decoder=(Slot("3"), Slot("0", ffn="shared"), Slot("0"), Slot("2", ffn="shared")))
DEEP_DECODER_PLAN = Plan(encoder=(Slot("1"),), decoder=(Slot("0"), Slot("4"), Slot("2")))


def _ids(shape, seed=0, vocab=128):
  return np.random.default_rng(seed).integers(2, vocab, shape).astype(np.int32)


def _padded(is_t5, lengths=(9, 6, 4)):
  """Encoder inputs right-padded (T5) or prompts left-padded (GPT-2), and their mask."""
  b, p = len(lengths), max(lengths)
  mask = np.zeros((b, p), np.int32)
  for row, n in enumerate(lengths):
    mask[row, slice(0, n) if is_t5 else slice(p - n, p)] = 1
  return np.where(mask == 1, _ids((b, p), seed=1), 0).astype(np.int32), mask


def _assert_logits_close(hf_logits, ours):
  ours = np.asarray(ours)
  scale = np.max(np.abs(ours))
  assert np.max(np.abs(hf_logits - ours)) <= 1e-4 * scale


def _hf_forward(hf_model, model, params, plan, is_t5):
  ids, mask = _padded(is_t5)
  with torch.no_grad():
    if is_t5:
      dec = np.concatenate([np.zeros((3, 1), np.int32), _ids((3, 5), seed=2)], axis=1)
      hf_out = hf_model(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask),
        decoder_input_ids=torch.tensor(dec, dtype=torch.long),
      ).logits.numpy()
      ours, _ = model(params, plan, jnp.asarray(ids), jnp.asarray(dec), encoder_mask=mask)
    else:
      ids = _ids((3, 7), seed=3)
      hf_out = hf_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
      ours, _ = model(params, plan, jnp.asarray(ids))
  _assert_logits_close(hf_out, ours)


def _assert_generate_matches(hf_model, model, params, plan, is_t5):
  """HF greedy ``generate`` and ``modjax.decoding.generate`` give the same rows (each up to its
  first EOS: HF pads finished rows its own way)."""
  ids, mask = _padded(is_t5)
  c = model.config
  with torch.no_grad():
    hf_out = hf_model.generate(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      max_new_tokens=NEW,
      num_beams=1,
      do_sample=False,
      pad_token_id=c.pad_token_id if c.pad_token_id is not None else c.eos_token_id,
    ).numpy()
  hf_new = hf_out[:, 1:] if is_t5 else hf_out[:, ids.shape[1] :]
  ours = generate(model, params, plan, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW)
  for row in range(len(ids)):
    n = int(ours.lengths[row])
    np.testing.assert_array_equal(np.asarray(ours.tokens[row, :n]), hf_new[row, :n])
    hits = np.flatnonzero(hf_new[row] == c.eos_token_id)
    assert n == (hits[0] + 1 if len(hits) else NEW), f"row {row}: lengths differ"


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_hf_export_of_a_reordered_plan_with_a_shared_ffn_matches_forward_and_generate(
  family, t5_deep, gpt2_bank, tmp_path
):
  import transformers

  is_t5 = family == "t5"
  (model, params), plan = (t5_deep, T5_PLAN) if is_t5 else (gpt2_bank, GPT2_PLAN)
  result = export.export_hf(tmp_path / "hf", model, params, plan)
  assert result.hf_generate_supported and result.note is None
  cls = transformers.T5ForConditionalGeneration if is_t5 else transformers.GPT2LMHeadModel
  hf_model = cls.from_pretrained(tmp_path / "hf").float().eval()
  layers = (hf_model.encoder.block, hf_model.decoder.block) if is_t5 else (hf_model.transformer.h,)
  assert [len(x) for x in layers] == [len(plan.stack(s)) for s in model.stacks]
  _hf_forward(hf_model, model, params, plan, is_t5)
  _assert_generate_matches(hf_model, model, params, plan, is_t5)
  record = json.loads((tmp_path / "hf" / export.HF_RECORD).read_text())
  assert Plan.from_dict(record["plan"]) == plan and record["hf_generate_supported"]


class _Capture(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_hf_export_of_a_deeper_decoder_warns_that_generate_cannot_run_it(t5_deep, tmp_path):
  import transformers

  model, params = t5_deep
  capture, logger = _Capture(), logging.getLogger("modjax.export")
  logger.addHandler(capture)
  try:
    result = export.export_hf(tmp_path / "hf", model, params, DEEP_DECODER_PLAN)
  finally:
    logger.removeHandler(capture)
  assert not result.hf_generate_supported
  assert (result.config.num_layers, result.config.num_decoder_layers) == (1, 3)
  assert len(capture.messages) == 1 and "generate" in capture.messages[0]
  record = json.loads((tmp_path / "hf" / export.HF_RECORD).read_text())
  assert record["hf_generate_supported"] is False and "generate" in record["note"]
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  _hf_forward(hf_model.float(), model, params, DEEP_DECODER_PLAN, is_t5=True)


@dataclasses.dataclass(frozen=True)
class _RoutedSlot(Slot):
  """A slot kind a standard checkpoint cannot hold (its FFN picked by a router at run time)."""

  pool: str = "experts"


def test_hf_export_refuses_a_slot_that_is_not_a_plain_block(t5_deep, tmp_path):
  model, params = t5_deep
  plan = dataclasses.replace(T5_PLAN, decoder=T5_PLAN.decoder + (_RoutedSlot("0"),))
  with pytest.raises(export.ExportError, match="decoder slot 3 .* not a plain block") as e:
    export.export_hf(tmp_path / "hf", model, params, plan)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "hf").exists()


# ---- Orbax subset ---------------------------------------------------------------------------


def test_orbax_subset_holds_only_the_used_entries_and_its_plan(t5_deep, tmp_path):
  model, params = t5_deep
  meta = bank.with_meta({}, "decoder", "blocks", "5", note="used")
  meta = bank.with_meta(meta, "decoder", "blocks", "4", note="unused")
  export.export_bank_subset(tmp_path / "sub", model, params, T5_PLAN, meta=meta, name="small")
  stored = bank_io.load_bank(tmp_path / "sub")
  assert sorted(stored.params["encoder"]["blocks"]) == ["0", "2", "3"]
  assert sorted(stored.params["decoder"]["blocks"]) == ["1", "3", "5"]
  assert sorted(stored.params["decoder"]["ffns"]) == ["shared"]
  assert stored.plan() == stored.plan("small") == T5_PLAN
  assert stored.meta == {"decoder/blocks/5": {"note": "used"}}
  got = bank.subset(params, T5_PLAN, model.stacks)
  jax.tree.map(np.testing.assert_array_equal, stored.params, got)


def test_a_tampered_saved_plan_is_a_one_line_plan_error(t5_deep, tmp_path):
  model, params = t5_deep
  export.export_bank_subset(tmp_path / "sub", model, params, T5_PLAN)
  tampered = Plan(encoder=T5_PLAN.encoder, decoder=(Slot("4"),))  # "4" is not in the subset
  (tmp_path / "sub" / "plans" / "default.json").write_text(tampered.to_json())
  with pytest.raises(PlanError, match="'default'.*names block '4'") as e:
    bank_io.load_bank(tmp_path / "sub")
  assert "\n" not in str(e.value)


# ---- jax.export -----------------------------------------------------------------------------

_FRESH = textwrap.dedent(
  """
  import sys
  import jax
  import numpy as np
  from modjax.store.export import load_jax_export

  directory, inputs, outputs = sys.argv[1:]
  x = dict(np.load(inputs))
  loaded = load_jax_export(directory)
  f = loaded.functions
  out = {}
  if "encoder" in f:
    out["encoder"] = f["encoder"](x["ids"], x["mask"])
  cache, logits, index = f["start_decoding"](x["ids"], x["mask"])
  out["start_logits"], out["start_index"] = logits, index
  n = len(jax.tree.leaves(cache))
  cache = jax.tree.unflatten(jax.tree.structure(cache), [x[f"cache{i}"] for i in range(n)])
  logits, cache = f["decode_step"](cache, x["tokens"], x["index"])
  out["step_logits"] = logits
  out.update({f"step_cache{i}": leaf for i, leaf in enumerate(jax.tree.leaves(cache))})
  np.savez(outputs, **{k: np.asarray(v) for k, v in out.items()})
  """
)


def _originals(model, plan, params, ids, mask, max_length):
  """The jitted functions the export was made from, run here."""
  start = jax.jit(lambda p, i, m: model.start_decoding(p, plan, i, m, max_length))
  cache, logits, index = start(params, ids, mask)
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  step = jax.jit(lambda p, c, t, i: model.decode_step(p, plan, c, t, i))
  step_logits, step_cache = step(params, cache, tokens, index)
  out = {"start_logits": logits, "start_index": index, "step_logits": step_logits}
  out.update({f"step_cache{i}": x for i, x in enumerate(jax.tree.leaves(step_cache))})
  if isinstance(model, T5):
    encode = jax.jit(lambda p, i, m: model.encode(p, plan, i, input_mask_BS=m)[0])
    out["encoder"] = encode(params, ids, mask)
  inputs = {"ids": ids, "mask": mask, "tokens": tokens, "index": index}
  inputs.update({f"cache{i}": x for i, x in enumerate(jax.tree.leaves(cache))})
  return inputs, out


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_jax_export_reloaded_in_a_fresh_process_computes_what_jit_computes(
  family, t5_deep, gpt2_bank, tmp_path
):
  (model, params), plan = (t5_deep, T5_PLAN) if family == "t5" else (gpt2_bank, GPT2_PLAN)
  # Tied heads (GPT-2 always): the decoding cache then carries the transposed head as well.
  assert getattr(model.config, "tie_word_embeddings", True)
  batch, length, max_length = 2, 6, 5
  manifest = export.export_jax(
    tmp_path / "jax", model, params, plan, batch=batch, input_length=length, max_length=max_length
  )
  ids, mask = _padded(family == "t5", lengths=(6, 4))
  inputs, want = _originals(model, plan, params, jnp.asarray(ids), jnp.asarray(mask), max_length)
  np.savez(tmp_path / "inputs.npz", **{k: np.asarray(v) for k, v in inputs.items()})
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  args = [str(tmp_path / n) for n in ("jax", "inputs.npz", "outputs.npz")]
  run = subprocess.run(
    [sys.executable, "-c", _FRESH, *args], env=env, capture_output=True, text=True, timeout=300
  )
  assert run.returncode == 0, run.stderr[-3000:]
  got = dict(np.load(tmp_path / "outputs.npz"))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], np.asarray(value), rtol=1e-6, atol=1e-6, err_msg=key)
  expected = {"start_decoding", "decode_step"} | ({"encoder"} if family == "t5" else set())
  assert set(manifest["functions"]) == expected
  step = manifest["functions"]["decode_step"]
  assert step["args"] == ["params", "cache", "token_ids", "index"]
  used = jax.tree.leaves(bank.subset(params, plan, model.stacks))
  cache_leaves = len([k for k in inputs if k.startswith("cache")])
  assert len(step["inputs"]) == len(used) + cache_leaves + 2  # params, cache, tokens, index
  assert Plan.from_dict(manifest["plan"]) == plan


def test_jax_export_refuses_lengths_beyond_the_position_table(gpt2_bank, tmp_path):
  model, params = gpt2_bank
  with pytest.raises(export.ExportError, match="n_positions=64"):
    export.export_jax(
      tmp_path / "jax", model, params, model.identity_plan(), batch=1, input_length=60, max_length=8
    )
  assert not (tmp_path / "jax").exists()


# ---- command line ---------------------------------------------------------------------------

CLI_CASES = ("good", "unknown_plan_name", "plan_file_with_unknown_block", "output_not_empty")


def _files(root) -> dict:
  out = {}
  for base, _, names in os.walk(root):
    for name in names:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def cli_runs(t5_deep, tmp_path_factory):
  """Every case's ``python -m modjax.export`` run at once (each mostly waits on imports), with
  the files under the test root before and after. Returns (root, {case: (rc, stderr)}, before,
  after)."""
  model, params = t5_deep
  root = tmp_path_factory.mktemp("cli")
  bank_io.save_bank(root / "bank", model, params, plans={"small": T5_PLAN})
  bad_plan = Plan(encoder=T5_PLAN.encoder, decoder=(Slot("99"),))
  (root / "bad_plan.json").write_text(bad_plan.to_json())
  (root / "full").mkdir()
  (root / "full" / "keep.txt").write_text("keep")
  plan = {"plan_file_with_unknown_block": str(root / "bad_plan.json")}
  out = {"output_not_empty": root / "full"}
  before = _files(root)
  procs = {}
  for case in CLI_CASES:
    args = [
      f"--bank={root / 'bank'}",
      f"--plan={plan.get(case, 'nosuch' if case == 'unknown_plan_name' else 'small')}",
      f"--out={out.get(case, root / case)}",
      "--formats=orbax,jax,hf",
      "--batch=1",
      "--input-length=8",
      "--max-length=4",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    procs[case] = subprocess.Popen(
      [sys.executable, "-m", "modjax.export", *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
  results = {}
  for case, proc in procs.items():
    _, stderr = proc.communicate(timeout=600)
    results[case] = (proc.returncode, stderr)
  return root, results, before, _files(root)


def test_cli_exports_a_saved_plan_in_every_format(cli_runs, t5_deep, tmp_path):
  root, results, _, _ = cli_runs
  rc, stderr = results["good"]
  assert rc == 0, stderr[-3000:]
  out = root / "good"
  summary = json.loads((out / "export.json").read_text())
  assert summary["formats"] == ["orbax", "jax", "hf"] and summary["hf_generate_supported"]
  stored = bank_io.load_bank(out / "orbax")
  assert stored.plan() == T5_PLAN and sorted(stored.params["decoder"]["blocks"]) == ["1", "3", "5"]
  manifest = json.loads((out / "jax" / export.MANIFEST).read_text())
  assert manifest["shapes"] == {"batch": 1, "input_length": 8, "max_length": 4}
  model, params = t5_deep
  export.export_hf(tmp_path / "hf", model, params, T5_PLAN)
  from safetensors.numpy import load_file

  want = load_file(tmp_path / "hf" / "model.safetensors")
  got = load_file(out / "hf" / "model.safetensors")
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("case", CLI_CASES[1:])
def test_cli_bad_input_is_one_error_line_exit_2_and_nothing_written(cli_runs, case):
  root, results, before, after = cli_runs
  rc, stderr = results[case]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert rc == 2 and len(errors) == 1, stderr[-3000:]
  assert "Traceback" not in stderr
  expected = {
    "unknown_plan_name": "no plan named 'nosuch'",
    "plan_file_with_unknown_block": "names block '99'",
    "output_not_empty": "exists and is not empty",
  }[case]
  assert expected in errors[0]
  assert not (root / case).exists()
  kept = {k: v for k, v in after.items() if not k.startswith("good" + os.sep)}
  assert kept == before
