"""Merge feed-forward sublayers of a bank: k consecutive layers share one aligned FFN.

  python -m modjax.merge --bank runs/ddtp_lm --config configs/ddtp_lm.py --k 2 \\
      --method permute --out runs/ddtp_lm_permute2
  python -m modjax.merge --bank runs/tiny_bank --plan fast-2x --config configs/modular_t5.py:tiny \\
      --k 2 --out runs/tiny_bank_merged          # merge inside an assembled Modular plan

``--bank``: a saved bank or a training workdir, merged under ``--plan`` (a saved plan's name;
default the bank's default plan). ``--method``: ``permute`` (align to the reference layer, then
average; the paper's), ``vanilla`` (average unaligned) or ``drop`` (the layer-drop baseline).
``--start``: the window's first layer, or ``auto`` (every window scored by teacher-forced
cross-entropy on the config's validation split, the best kept). ``--stacks``: for T5 the same
window in both stacks by default; ``encoder`` or ``decoder`` for one. The features come from
``--calib-tokens`` tokens of the config's training split, with progress (tokens/s, ETA).

Writes ``--out`` (must not exist or be empty): an Orbax bank of what the merged plan reads (each
shared FFN once), its vocabulary and ``merge.json`` (``modjax.methods.ffn_merge.commands``).
Then: ``python -m modjax.evaluate --config ... --bank OUT`` scores it, ``python -m modjax.train
--config configs/ffn_merge.py:...`` recovers it, ``python -m modjax.export --bank OUT --plan
merged --formats hf`` writes a checkpoint ``transformers`` loads. Bad input is one ``error:``
line and exit status 2.
"""

from __future__ import annotations

import json

from modjax.methods.ffn_merge.align import REFERENCES
from modjax.methods.ffn_merge.merge import METHODS


def _define_flags(flags) -> None:
  flags.DEFINE_string("bank", None, "The bank to merge: a saved bank or a training workdir.")
  flags.DEFINE_string("plan", None, "The plan to merge under (a saved name; default: default).")
  flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).")
  flags.DEFINE_integer("k", 2, "FFNs merged into one (the window's size).")
  flags.DEFINE_enum("method", "permute", list(METHODS), "How the window's FFNs are combined.")
  flags.DEFINE_string("start", "auto", "The window's first layer, or 'auto' (best on validation).")
  flags.DEFINE_list("stacks", None, "Stacks to merge (default every stack: T5 both).")
  flags.DEFINE_enum("reference", "first", list(REFERENCES), "The layer the others align to.")
  flags.DEFINE_integer("calib-tokens", 10_000, "Tokens of the training split for the features.")


def _start(text: str):
  if text == "auto":
    return "auto"
  try:
    return int(text)
  except ValueError:
    from modjax.plan import PlanError

    raise PlanError(f"--start {text!r} must be 'auto' or a layer index such as 0") from None


def _dispatch(f, config) -> None:
  from modjax.methods.ffn_merge.commands import merge_bank
  from modjax.train.experiment import ConfigError

  given = (("bank", f.bank), ("out", f.out), ("config", config))
  missing = [name for name, value in given if value is None]
  if missing:
    raise ConfigError(f"missing {', '.join('--' + m for m in missing)}; see --help")
  record = merge_bank(
    f.bank,
    config,
    f.out,
    k=f.k,
    method=f.method,
    start=_start(f.start),
    stacks=f.stacks,
    reference=f.reference,
    calib_tokens=f["calib-tokens"].value,
    plan=f.plan,
  )
  keys = ("method", "k", "start", "stacks", "params")
  print(json.dumps({key: record[key] for key in keys}))


def main(config) -> None:
  """The command (module docstring) over the parsed flags and the optional ``--config``."""
  from absl import flags

  _dispatch(flags.FLAGS, config)


if __name__ == "__main__":
  from absl import flags

  from modjax import cli

  _define_flags(flags)
  cli.run(main, config="optional")
