"""Merge feed-forward sublayers of a bank: k consecutive layers share one aligned FFN.

  python -m modjax.merge --bank runs/ddtp_lm --config configs/ddtp_lm.py --k 2 \\
      --method permute --out runs/ddtp_lm_permute2
  python -m modjax.merge --bank runs/tiny_bank --plan fast-2x --config configs/modular_t5.py:tiny \\
      --k 2 --out runs/tiny_bank_merged          # merge inside an assembled Modular plan
  python -m modjax.merge --bank runs/ddtp_ende --config configs/ddtp_ende.py \\
      --windows encoder:0-2,3-5 --windows decoder:1-3 --out runs/ende_two_windows
  python -m modjax.merge --hf path/to/gpt2 --config configs/ddtp_lm.py --k 3 --out runs/gpt2_k3

``--bank``: a saved bank or a training workdir, merged under ``--plan`` (a saved plan's name;
default the bank's default plan); ``--hf``: a Hugging Face ``save_pretrained`` directory (T5 or
GPT-2; its ``tokenizer.json`` is the vocabulary unless ``data.vocab_path`` names one).
``--method``: ``permute`` (align to the reference layer, then average; the paper's), ``vanilla``
(average unaligned) or ``drop`` (the baseline: every layer of the window removed, so ``--k 3``
drops three whole layers). ``--start``: the window's first layer (one index for every stack, or
``encoder=0,decoder=2``), or ``auto`` (every window scored by teacher-forced cross-entropy on the
config's validation split, the best kept). ``--windows`` instead of ``--k``/``--start``: explicit
ranges, several per stack (``0-2,3-5``: positions 0-1 and 3-4 each share one FFN;
``decoder:1-3`` for one stack; ``--method drop --windows 4,5`` drops layers 4 and 5).
``--stacks``: for T5 the same window in both stacks by default; ``encoder`` or ``decoder`` for one.
``--features``: the FFN branch the units are aligned on: ``gate`` (the pre-activation; ``wi_0``
of a gated FFN; the paper's) or ``up`` (a gated FFN's ``wi_1``). The features come from
``--calib-tokens`` tokens of the config's training split, with progress (tokens/s, ETA).

Writes ``--out`` (must not exist or be empty): an Orbax bank of what the merged plan reads (each
shared FFN once), its vocabulary and ``merge.json`` (``modjax.methods.ffn_merge.commands``: the
windows, the dropped layers, exact parameter counts and their fraction).
Then: ``python -m modjax.evaluate --config ... --bank OUT`` scores it, ``python -m modjax.train
--config configs/ffn_merge.py:...`` recovers it, ``python -m modjax.export --bank OUT --plan
merged --formats hf`` writes a checkpoint ``transformers`` loads. Bad input is one ``error:``
line and exit status 2.
"""

from __future__ import annotations

import json

from modjax.methods.ffn_merge.align import REFERENCES
from modjax.methods.ffn_merge.features import BRANCHES
from modjax.methods.ffn_merge.merge import METHODS


def _define_flags(flags) -> None:
  flags.DEFINE_string("bank", None, "The bank to merge: a saved bank or a training workdir.")
  flags.DEFINE_string("hf", None, "Or a Hugging Face save_pretrained directory (T5, GPT-2).")
  flags.DEFINE_string("plan", None, "The plan to merge under (a saved name; default: default).")
  flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).")
  flags.DEFINE_integer("k", 2, "The window's size: FFNs merged into one, or layers dropped.")
  flags.DEFINE_enum("method", "permute", list(METHODS), "How the window's FFNs are combined.")
  flags.DEFINE_string(
    "start", "auto", "The window's first layer (or encoder=0,decoder=2), or 'auto' (best)."
  )
  flags.DEFINE_multi_string(
    "windows", None, "Explicit ranges instead of --k/--start: 0-2,3-5 or decoder:1-3 (repeatable)."
  )
  flags.DEFINE_list("stacks", None, "Stacks to merge (default every stack: T5 both).")
  flags.DEFINE_enum("reference", "first", list(REFERENCES), "The layer the others align to.")
  flags.DEFINE_enum("features", "gate", list(BRANCHES), "FFN branch aligned on (up: gated wi_1).")
  flags.DEFINE_integer("calib-tokens", 10_000, "Tokens of the training split for the features.")


def _dispatch(f, config) -> None:
  from modjax.methods.ffn_merge.commands import merge_bank
  from modjax.train.experiment import ConfigError

  missing = [name for name, value in (("out", f.out), ("config", config)) if value is None]
  if f.bank is None and f.hf is None:
    missing.insert(0, "bank (or --hf)")
  if missing:
    raise ConfigError(f"missing {', '.join('--' + m for m in missing)}; see --help")
  if f.bank is not None and f.hf is not None:
    raise ConfigError("give --bank or --hf, not both")
  record = merge_bank(
    f.bank or f.hf,
    config,
    f.out,
    k=f.k if f["k"].present or not f.windows else None,
    method=f.method,
    start=f.start,
    windows=f.windows or None,
    stacks=f.stacks,
    reference=f.reference,
    features=f.features,
    calib_tokens=f["calib-tokens"].value,
    plan=f.plan,
    hf_only=f.hf is not None,
  )
  keys = ("method", "k", "start", "windows", "stacks", "params")
  print(json.dumps({key: record[key] for key in keys}))


def main(config) -> None:
  """The command (module docstring) over the parsed flags and the optional ``--config``."""
  from absl import flags

  _dispatch(flags.FLAGS, config)


if __name__ == "__main__":
  from absl import flags

  from modjax.core import cli

  _define_flags(flags)
  cli.run(main, config="optional")
