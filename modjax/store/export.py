"""Exporting a (bank, plan): the entries it uses, serving graphs, a Hugging Face checkpoint.

Three formats, each a self-contained directory:

* ``orbax`` (:func:`export_bank_subset`): a saved bank (``modjax.store.bank_io``) holding only the
  entries the plan uses, with the plan as ``plans/default.json``; ``bank_io.load_bank`` validates
  it on every load, so a plan that names a missing entry never reaches a model.
* ``jax`` (:func:`export_jax`): ``jax.export`` graphs of the encoder (T5), the decoding start
  (T5: encoder + cross-attention keys/values + the first step; GPT-2: the prompt prefill) and ONE
  cached decoding step, with the plan baked in and the parameters as explicit inputs, so one
  graph serves any weights of that shape (fine-tuned, re-quantised) and the files stay small.
  The weights go beside them as an ``orbax`` subset bank rather than an ``.npz``: it restores
  bfloat16 exactly (numpy has no bfloat16), is read shard by shard on any mesh, and re-checks
  the plan on load. :func:`load_jax_export` returns the callables, in a process that needs
  neither modjax's models nor the plan.
* ``hf`` (:func:`export_hf`): a ``save_pretrained`` directory of the plan made plain
  (``bank.materialize``: slots become blocks 0..n-1, shared FFNs written into every layer).

``python -m modjax.export`` (``modjax/export.py``) is the command over :func:`export`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
from etils import epath

from modjax.core.errors import UserError
from modjax.core.plan import Plan, PlanError, Slot
from modjax.models import T5, bank
from modjax.store import bank_io, hf

log = logging.getLogger("modjax.export")  # not __name__: "__main__" under python -m

FORMATS = ("orbax", "jax", "hf")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
MANIFEST = "manifest.json"
PARAMS_DIR = "bank"  # the jax export's weights: a subset bank
HF_RECORD = "modjax_export.json"  # beside an HF export: the plan it came from, what HF can run


class ExportError(UserError, ValueError):
  """An export that cannot be written as asked (output directory, sizes, plan kind, files)."""


def check_output_dir(directory) -> epath.Path:
  """The output directory, which must not exist or be empty: exports never overwrite."""
  root = epath.Path(directory)
  if root.exists() and (not root.is_dir() or any(root.iterdir())):
    raise ExportError(f"{root} exists and is not empty; choose a new output directory")
  return root


# ---- Orbax: the used entries ----------------------------------------------------------------


def export_bank_subset(directory, model, params, plan: Plan, *, meta=None, name="default") -> dict:
  """Saves the entries ``plan`` uses (``bank.subset``) as a bank with the plan beside it.

  The plan is written as ``plans/<name>.json`` and as the bank's default plan (the plan this
  bank was made for; the model's identity plan would name entries the subset dropped).
  Metadata of dropped entries is dropped too. Returns the saved parameters.
  """
  bank.validate_plan(plan, params, model.stacks)
  check_output_dir(directory)
  used = bank.subset(params, plan, model.stacks)
  kept = {k: v for k, v in (meta or {}).items() if _entry_present(used, k)}
  plans = {bank_io.DEFAULT_PLAN: plan, name: plan}
  bank_io.save_bank(directory, model, used, meta=kept, plans=plans)
  return used


def _entry_present(params, key: str) -> bool:
  parts = key.split("/")
  if len(parts) != 3 or parts[1] not in bank.KINDS:
    return True  # not an entry's metadata: keep it
  stack, kind, name = parts
  return name in params.get(stack, {}).get(kind, {})


# ---- jax.export: encoder, decoding start, one decoding step ---------------------------------


def _graphs(model, plan: Plan, max_length: int) -> dict:
  """name -> (function of (params, *inputs), names of its arguments); the plan is static."""

  def start(params, input_ids, input_mask):
    return model.start_decoding(params, plan, input_ids, input_mask, max_length)

  def step(params, cache, token_ids, index):
    return model.decode_step(params, plan, cache, token_ids, index)

  graphs = {}
  if isinstance(model, T5):

    def encoder(params, input_ids, input_mask):
      return model.encode(params, plan, input_ids, input_mask_BS=input_mask)[0]

    graphs["encoder"] = (encoder, ("params", "input_ids", "input_mask"))
  graphs["start_decoding"] = (start, ("params", "input_ids", "input_mask"))
  graphs["decode_step"] = (step, ("params", "cache", "token_ids", "index"))
  return graphs


def _check_jax_args(model, batch: int, input_length: int, max_length: int, platforms) -> tuple:
  for flag, value in (("batch", batch), ("input_length", input_length), ("max_length", max_length)):
    if not isinstance(value, int) or value < 1:
      raise ExportError(f"{flag} must be a positive integer, got {value!r}")
  platforms = tuple(platforms or ("cpu",))
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ExportError(f"unknown platforms {unknown}; choose from {PLATFORMS}")
  positions = getattr(model.config, "n_positions", None)
  if positions is not None and input_length + max_length > positions:
    raise ExportError(
      f"input_length ({input_length}) + max_length ({max_length}) exceed the model's "
      f"n_positions={positions}; shorten them"
    )
  return platforms


def export_jax(
  directory,
  model,
  params,
  plan: Plan,
  *,
  batch: int,
  input_length: int,
  max_length: int,
  platforms=None,
  meta=None,
) -> dict:
  """Writes ``<name>.jaxexport`` per graph, the used weights (``bank/``) and ``manifest.json``.

  Shapes are fixed: ``batch`` rows of ``input_length`` tokens (T5 encoder inputs, or left-padded
  GPT-2 prompts) and room for ``max_length`` generated tokens. ``platforms``: any of
  :data:`PLATFORMS` (default ``("cpu",)``); one file then runs on each. Returns the manifest.
  """
  bank.validate_plan(plan, params, model.stacks)
  platforms = _check_jax_args(model, batch, input_length, max_length, platforms)
  root = check_output_dir(directory)
  used = bank.subset(params, plan, model.stacks)
  ids = jax.ShapeDtypeStruct((batch, input_length), jnp.int32)
  specs = {"params": jax.tree.map(_spec, used), "input_ids": ids, "input_mask": ids}
  graphs = _graphs(model, plan, max_length)
  cache = jax.eval_shape(graphs["start_decoding"][0], specs["params"], ids, ids)[0]
  specs.update(
    cache=cache,
    token_ids=jax.ShapeDtypeStruct((batch,), jnp.int32),
    index=jax.ShapeDtypeStruct((), jnp.int32),
  )
  exported = {}  # lowering errors surface here, before anything is written
  for name, (fn, args) in graphs.items():
    exp = jax.export.export(jax.jit(fn), platforms=platforms)(*(specs[a] for a in args))
    exported[name] = (exp, args)
  export_bank_subset(root / PARAMS_DIR, model, used, plan, meta=meta)
  functions = {}
  for name, (exp, args) in exported.items():
    (root / f"{name}.jaxexport").write_bytes(bytes(exp.serialize()))
    functions[name] = _describe(exp, args, f"{name}.jaxexport")
  c = model.config
  manifest = {
    "format": "modjax.jax_export/1",
    "jax_version": jax.__version__,
    "platforms": list(platforms),
    "model": bank_io.config_to_dict(c),
    "plan": plan.to_dict(),
    "params": PARAMS_DIR,
    "shapes": {"batch": batch, "input_length": input_length, "max_length": max_length},
    "decoding": {
      "eos_token_id": c.eos_token_id,
      "pad_token_id": c.pad_token_id,
      "first_step_index": 1 if isinstance(model, T5) else input_length,
    },
    "functions": functions,
  }
  (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
  log.info("wrote jax.export graphs %s (%s) to %s", sorted(functions), ",".join(platforms), root)
  return manifest


def _spec(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _describe(exp, args, file: str) -> dict:
  """What a loader needs: argument names, and every flat input and output in calling order
  (``jax.export`` takes and returns flat arrays; ``in_tree``/``out_tree`` rebuild the pytrees)."""

  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
      {"path": jax.tree_util.keystr(p), "shape": list(a.shape), "dtype": str(a.dtype)}
      for p, a in leaves
    ]

  ins, _ = exp.in_tree.unflatten(exp.in_avals)
  outs = exp.out_tree.unflatten(exp.out_avals)
  return {
    "file": file,
    "args": list(args),
    "in_tree": str(exp.in_tree),
    "out_tree": str(exp.out_tree),
    "inputs": flat(dict(zip(args, ins, strict=True))),
    "outputs": flat(outs),
  }


@dataclasses.dataclass
class JaxExport:
  """What :func:`load_jax_export` returns. ``functions[name](*inputs)`` calls a graph with the
  exported weights (arguments after ``params``, see ``manifest["functions"][name]["args"]``);
  ``exported[name].call(params, *inputs)`` with other weights of the same shapes."""

  manifest: dict
  exported: dict
  params: dict | None
  functions: dict


def load_jax_export(directory, *, load_params: bool = True) -> JaxExport:
  """Deserialises the graphs of :func:`export_jax` (and restores its weights)."""
  root = epath.Path(directory)
  if not (root / MANIFEST).exists():
    raise ExportError(f"{root} has no {MANIFEST}; give a directory written by export_jax")
  manifest = json.loads((root / MANIFEST).read_text())
  exported = {}
  for name, info in manifest["functions"].items():
    try:
      exported[name] = jax.export.deserialize(bytearray((root / info["file"]).read_bytes()))
    except Exception as e:  # noqa: BLE001 -- a missing or damaged file, whatever jax raises
      raise ExportError(f"cannot load {root / info['file']} ({type(e).__name__}: {e})") from e
  params = bank_io.load_bank(root / manifest["params"]).params if load_params else None
  functions = {
    name: functools.partial(exp.call, params) for name, exp in exported.items() if load_params
  }
  return JaxExport(manifest, exported, params, functions)


# ---- Hugging Face -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HFExport:
  directory: str
  config: object  # the materialised T5Config | GPT2Config
  hf_generate_supported: bool
  note: str | None = None


def check_plain_plan(model, params, plan: Plan) -> None:
  """Raises unless every slot is a plain block (optionally with a shared FFN), the only thing a
  standard checkpoint can hold."""
  bank.validate_plan(plan, params, model.stacks)
  for stack in model.stacks:
    for i, slot in enumerate(plan.stack(stack)):
      if type(slot) is not Slot:
        raise ExportError(
          f"{stack} slot {i} ({slot}) is not a plain block; a Hugging Face checkpoint holds "
          "plain blocks only, export this plan as orbax or jax"
        )
      entry = bank.slot_params(params[stack], slot)  # a block stored without its tied FFN
      bank.check_entry_shapes(model, stack, "blocks", slot.block, entry)


def _generate_note(config) -> str | None:
  layers, decoder_layers = (
    getattr(config, "num_layers", 0),
    getattr(config, "num_decoder_layers", 0),
  )
  if decoder_layers > layers:
    return (
      f"the exported T5 has a deeper decoder ({decoder_layers} layers) than encoder ({layers}): "
      "transformers' T5 forward pass runs it, but its generate() cannot (IndexError in its "
      "cache, transformers 5.x); decode with modjax.decoding.generate"
    )
  return None


def export_hf(directory, model, params, plan: Plan, *, overwrite: bool = False) -> HFExport:
  """A ``save_pretrained`` directory computing what ``plan`` computes over ``params``."""
  check_plain_plan(model, params, plan)
  if not overwrite:
    check_output_dir(directory)
  plain, _ = bank.materialize(params, plan, model.stacks)
  config = bank.materialized_config(model.config, plan)
  note = _generate_note(config)
  hf.export_checkpoint(config, plain, os.fspath(directory), overwrite=overwrite)
  record = {"plan": plan.to_dict(), "hf_generate_supported": note is None, "note": note}
  (epath.Path(directory) / HF_RECORD).write_text(json.dumps(record, indent=1))
  if note:
    log.warning("%s: %s", directory, note)
  return HFExport(os.fspath(directory), config, note is None, note)


# ---- everything at once, and the command line -----------------------------------------------


def resolve_plan(stored: bank_io.StoredBank, ref: str) -> Plan:
  """``ref`` is a plan saved in the bank (its name) or a plan JSON file; validated either way."""
  if ref.endswith(".json") or os.sep in ref or os.path.isfile(ref):
    plan = bank_io.read_plan_file(ref)
    try:
      return plan.validate(stored.params, stored.model.stacks)
    except PlanError as e:
      raise PlanError(f"plan file {ref}: {e}") from e
  return stored.plan(ref)


def export(
  bank_dir,
  plan_ref: str,
  out,
  *,
  formats=FORMATS,
  batch: int = 1,
  input_length: int = 64,
  max_length: int = 64,
  platforms=("cpu",),
) -> dict:
  """Exports a saved bank's (or training workdir's) plan as ``out/<format>/`` per format and a
  summary ``out/export.json``. Everything is checked before anything is written."""
  formats = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ExportError(f"unknown formats {unknown}; choose from {','.join(FORMATS)}")
  root = check_output_dir(out)
  stored = bank_io.load_bank(bank_dir)
  model, params, plan = stored.model, stored.params, resolve_plan(stored, plan_ref)
  if "hf" in formats:
    check_plain_plan(model, params, plan)
  if "jax" in formats:
    platforms = _check_jax_args(model, batch, input_length, max_length, platforms)
  summary = {"bank": os.fspath(bank_dir), "plan": plan.to_dict(), "formats": list(formats)}
  if "orbax" in formats:
    export_bank_subset(root / "orbax", model, params, plan, meta=stored.meta)
  if "jax" in formats:
    export_jax(
      root / "jax",
      model,
      params,
      plan,
      batch=batch,
      input_length=input_length,
      max_length=max_length,
      platforms=platforms,
      meta=stored.meta,
    )
  if "hf" in formats:
    result = export_hf(root / "hf", model, params, plan)
    summary.update(hf_generate_supported=result.hf_generate_supported, hf_note=result.note)
  (root / "export.json").write_text(json.dumps(summary, indent=1))
  log.info("exported %s of plan %s to %s", ",".join(formats), plan.describe(), root)
  return summary
