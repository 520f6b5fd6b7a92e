"""``python -m modjax.export --bank DIR --plan NAME_OR_FILE --out DIR [--formats orbax,jax,hf]``

Writes a saved bank's plan in any of ``modjax.store.export.FORMATS`` (see that module); bad input
is one ``error:`` line, exit 2, and nothing written. ``python -m modjax.assemble export`` takes
the same flags (:func:`export_from_flags`).
"""

from __future__ import annotations

from modjax.store.export import FORMATS, PLATFORMS, export


def define_flags(flags) -> None:
  """The export flags (``assemble`` defines its own ``--bank``, ``--plan``, ``--out``,
  ``--batch`` and ``--input-length`` and adds :func:`define_format_flags`)."""
  flags.DEFINE_string("bank", None, "A saved bank directory or a training workdir.")
  flags.DEFINE_string("plan", None, "A plan saved in the bank (its name) or a plan JSON file.")
  flags.DEFINE_string("out", None, "Output directory; must not exist or be empty.")
  flags.DEFINE_integer("batch", 1, "jax: rows per call.")
  flags.DEFINE_integer("input-length", 64, "jax: encoder input / prompt length (tokens).")
  define_format_flags(flags)


def define_format_flags(flags) -> None:
  flags.DEFINE_list("formats", list(FORMATS), f"Any of {','.join(FORMATS)}.")
  flags.DEFINE_integer("max-length", 64, "jax: generated tokens the decoding cache holds.")
  flags.DEFINE_list("platforms", ["cpu"], f"jax: platforms to lower for, any of {PLATFORMS}.")


def export_from_flags(f) -> dict:
  """:func:`modjax.store.export.export` of the parsed flags (this command's and ``assemble``'s)."""
  return export(
    f.bank,
    f.plan,
    f.out,
    formats=f.formats,
    batch=f.batch,
    input_length=f["input-length"].value,
    max_length=f["max-length"].value,
    platforms=f.platforms,
  )


def main() -> None:
  from absl import flags

  export_from_flags(flags.FLAGS)


if __name__ == "__main__":
  from absl import flags

  from modjax.core import cli

  define_flags(flags)
  flags.mark_flags_as_required(["bank", "plan", "out"])
  cli.run(main, config="none")
