"""The one command-line runner of every ``python -m modjax.<command>`` (:func:`run`).

It is absl's ``app.run`` with modjax's flag parsing (``--config configs/x.py:arg`` and
``--config.key=value`` overrides beside each command's own absl flags; a bad flag, a config file
that fails to load or an unknown key is one ``error:`` line) and one error contract: a
:class:`modjax.core.errors.UserError` raised by the command is one ``error: ...`` line on stderr and
exit status 2, with no traceback. A command module defines its flags and ends with
``cli.run(main)``; ``main`` is an importable function over the parsed config.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from modjax.core.errors import UserError

EXIT_BAD_INPUT = 2
CONFIG_MODES = ("required", "optional", "none")


def fail(message: str) -> NoReturn:
  """Bad input: one ``error:`` line on stderr (whitespace folded) and exit status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


class ConfigFileError(UserError):
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
  """``--config``: a configs/*.py file (``:arg`` optional), loaded while the flags are parsed."""
  if "config" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with :arg.", lock_config=True
  )
  flags.FLAGS["config"].parser = _EagerConfigFileParser("config", lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (the positional arguments are returned), with a bad flag, an unloadable
  ``--config`` file or an unknown config key reported as one ``error:`` line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except (ConfigFileError, flags.Error) as e:
    message = str(e)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is not there
    message = _unknown_key_message(e, argv)
  except OSError as e:  # ml_collections: the --config file could not be loaded
    message = str(e)
  if "config" in flags.FLAGS:
    fail(f"{message} (see --helpfull for the flags and the config file's keys)")
  fail(f"{message} (see --help)")


def _unknown_key_message(e: BaseException, argv: list[str]) -> str:
  while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError("'key'\nDid you..."))
    e = e.args[0]
  key, _, hint = str(e).partition("\n")
  key = key.strip("'\"")
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  named = [a for a in overrides if key in a[len("--config.") :].split(".")] or overrides
  return f"unknown config key {key!r} in {', '.join(named)}" + (f"; {hint}" if hint else "")


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


def run(main: Callable[..., None], *, config: str = "required", positional: bool = False) -> None:
  """Runs ``main`` as the program: parses the flags (the command's own absl flags, defined
  before this call, and ``--config``), sets up logging and calls ``main``; a
  :class:`~modjax.core.errors.UserError` from it is one ``error:`` line and exit 2.

  ``config``: ``"required"`` (``main(config)`` gets the parsed, locked ConfigDict; without
  ``--config`` the run stops with an error), ``"optional"`` (``main(config)`` gets it or None) or
  ``"none"`` (the command takes no ``--config``; ``main()``). ``positional``: ``main`` also gets
  the positional arguments (``main(config, *args)``); otherwise any is an error."""
  if config not in CONFIG_MODES:
    raise ValueError(f"config={config!r}: use one of {CONFIG_MODES}")
  if config != "none":
    define_config_flag()

  def wrapped(argv: list[str]) -> None:
    args = argv[1:]
    if args and not positional:
      hint = "settings go in --config.key=value" if config == "required" else "see --help"
      fail(f"unexpected arguments {args}; {hint}")
    given = () if config == "none" else (flags.FLAGS.config,)
    if config == "required" and given[0] is None:
      fail("--config is required, e.g. --config configs/tiny.py")
    configure_logging()
    try:
      main(*given, *args)
    except UserError as e:
      fail(str(e))

  app.run(wrapped, flags_parser=parse_flags)
