"""Shared command-line plumbing: ``--config configs/x.py:arg --config.key=value`` parsing and
one-line errors with a non-zero exit for every known kind of bad input."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from modjax.bank import BankError
from modjax.checkpoint import CheckpointError
from modjax.data import DataError
from modjax.interop.hf import HFInteropError
from modjax.model_config import ModelConfigError
from modjax.plan import PlanError
from modjax.sharding import MeshError
from modjax.train.experiment import ConfigError
from modjax.train.optim import OptimizerConfigError

USER_ERRORS = (
  BankError,
  ConfigError,
  DataError,
  CheckpointError,
  HFInteropError,
  ModelConfigError,
  PlanError,
  MeshError,
  OptimizerConfigError,
)
EXIT_BAD_INPUT = 2


class ConfigFileError(Exception):
  """The --config file is missing or fails to load. Deliberately not a ValueError: absl would
  rewrap that as an IllegalFlagValueError carrying ml_collections' traceback text."""


class _EagerConfigFileParser(ConfigFileFlagParser):
  """ml_collections' parser, but a file that is missing, does not compile or whose get_config
  raises fails while the flags are parsed. The stock parser defers a missing file to the first
  access of the config (so a run without --config.x= overrides died later with a traceback) and
  embeds a traceback in the message of a get_config ValueError."""

  def parse(self, path):
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      raise ConfigFileError(
        f"config file {file!r} not found; give --config an existing file, e.g. configs/tiny.py"
      )
    try:
      config = super().parse(path)
      getattr(config, "lock", None)  # a deferred load failure raises on first attribute access
    except Exception as e:  # noqa: BLE001 -- whatever the file raises is the user's to fix
      if "Error whilst parsing config file" in str(e) and e.__context__ is not None:
        e = e.__context__  # ml_collections' rewrap of a ValueError/TypeError: report the original
      raise ConfigFileError(
        f"config file {path!r} failed to load: {type(e).__name__}: {e}; fix the file"
      ) from None
    if config is None:
      raise ConfigFileError(f"{file}: get_config() returned None; make it return the ConfigDict")
    return config


def define_config_flag() -> None:
  config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with :arg.", lock_config=True
  )
  flags.FLAGS["config"].parser = _EagerConfigFileParser("config", lock_config=True)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (ConfigFileError, flags.Error) as e:
    message = " ".join(str(e).split())
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is not there
    while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError("'key'\nDid you..."))
      e = e.args[0]
    key, _, hint = str(e).partition("\n")
    key = key.strip("'\"")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in overrides if key in a[len("--config.") :].split(".")] or overrides
    message = f"unknown config key {key!r} in {', '.join(named)}" + (f"; {hint}" if hint else "")
  except OSError as e:  # ml_collections: the --config file could not be loaded
    message = " ".join(str(e).split())
  print(
    f"error: {message} (see --helpfull for the flags and the config file's keys)", file=sys.stderr
  )
  sys.exit(EXIT_BAD_INPUT)


def configure_logging() -> None:
  """modjax's progress at INFO on stderr; libraries (Orbax, TF) only at WARNING and above."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = logging.getLogger("modjax")
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def run(main, extra_errors: tuple = ()) -> None:
  """absl's app.run with one-line errors; ``main(config)`` gets the parsed, locked config.
  ``extra_errors``: further exception types that mean bad input (a method's own)."""

  def wrapped(argv):
    if len(argv) > 1:
      print(
        f"error: unexpected arguments {argv[1:]}; settings go in --config.key=value",
        file=sys.stderr,
      )
      sys.exit(EXIT_BAD_INPUT)
    config = flags.FLAGS.config
    if config is None:
      print("error: --config is required, e.g. --config configs/tiny.py", file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)
    configure_logging()
    try:
      main(config)
    except USER_ERRORS + tuple(extra_errors) as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)

  app.run(wrapped, flags_parser=_parse_flags)
