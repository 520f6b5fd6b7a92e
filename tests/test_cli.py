"""The one command-line runner (``modjax.core.cli.run``), the one bad-input base class
(``modjax.core.errors.UserError``) and configs as values (``modjax.core.run_config``).

The runner cases run small programs over ``cli.run`` in a subprocess each (absl's flags are
global to a process); they import no JAX, so each takes about a second.
"""

import importlib
import inspect
import pkgutil
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from train_helpers import REPO, TRACEBACK, subprocess_env

import modjax
from modjax.core.errors import ConfigError, UserError
from modjax.core.run_config import with_values

# Exceptions of modjax that are not bad input: a run that diverged (exit 3, not 2).
NOT_USER_ERRORS = {"NonFiniteLossError"}


def _modjax_modules():
  for info in pkgutil.walk_packages(modjax.__path__, "modjax."):
    if not info.name.endswith("__main__"):
      yield importlib.import_module(info.name)


def test_every_error_class_of_modjax_is_a_user_error_and_keeps_its_builtin_base():
  found = {}
  for module in _modjax_modules():
    for name, value in vars(module).items():
      is_own = inspect.isclass(value) and value.__module__ == module.__name__
      if is_own and issubclass(value, Exception) and name not in NOT_USER_ERRORS:
        found[f"{module.__name__}.{name}"] = value
  assert len(found) >= 15, sorted(found)  # ConfigError, PlanError, DataError, BankError, ...
  assert all(issubclass(cls, UserError) for cls in found.values()), sorted(
    name for name, cls in found.items() if not issubclass(cls, UserError)
  )
  from modjax.core.plan import PlanError
  from modjax.store.checkpoint import CheckpointError
  from modjax.train import experiment

  assert issubclass(PlanError, ValueError) and issubclass(CheckpointError, RuntimeError)
  assert experiment.ConfigError is ConfigError and issubclass(ConfigError, ValueError)


def _program(body: str, *args: str) -> subprocess.CompletedProcess:
  """Runs ``body`` (a module that ends in ``cli.run(...)``) as a program with ``args``."""
  source = "from absl import flags\nfrom modjax.core import cli\nfrom modjax.core.errors import UserError\n"
  return subprocess.run(
    [sys.executable, "-c", source + textwrap.dedent(body), *args],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )


def _error_line(result) -> str:
  assert result.returncode == 2, result.stderr
  assert TRACEBACK not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


def test_a_user_error_is_one_line_and_exit_2_anything_else_a_traceback():
  body = """
    def main():
      raise UserError("the  thing\\n  is bad; fix it")
    cli.run(main, config="none")
  """
  assert _error_line(_program(body)) == "error: the thing is bad; fix it"
  bug = _program(body.replace("UserError(", "KeyError("))
  assert bug.returncode == 1 and TRACEBACK in bug.stderr


def test_the_runner_checks_config_flags_and_positional_arguments(tmp_path):
  config = tmp_path / "c.py"
  config.write_text(
    "import ml_collections\n\ndef get_config():\n"
    "  return ml_collections.ConfigDict({'workdir': '', 'n': 1})\n"
  )
  required = """
    def main(config):
      print("n", config.n)
    cli.run(main)
  """
  assert "--config is required" in _error_line(_program(required))
  assert "unexpected arguments ['extra']" in _error_line(
    _program(required, f"--config={config}", "extra")
  )
  assert "unknown config key 'nope'" in _error_line(
    _program(required, f"--config={config}", "--config.nope=1")
  )
  ran = _program(required, f"--config={config}", "--config.n=3")
  assert ran.returncode == 0 and ran.stdout == "n 3\n", ran.stderr
  optional = """
    flags.DEFINE_integer("k", 2, "a command's own flag")
    def main(config, *args):
      print(config is None, flags.FLAGS.k, list(args))
    cli.run(main, config="optional", positional=True)
  """
  ran = _program(optional, "--k=5", "sweep")
  assert ran.returncode == 0 and ran.stdout == "True 5 ['sweep']\n", ran.stderr
  no_config = """
    def main():
      print("ran")
    cli.run(main, config="none")
  """
  assert _error_line(_program(no_config, "--config=x")).endswith("(see --help)")


def test_with_values_returns_a_changed_copy_and_leaves_the_config_as_it_was():
  cfg = ml_collections.ConfigDict({"workdir": "", "data": {"vocab_path": "", "extra_ids": 100}})
  cfg.lock()
  new = with_values(cfg, {"data.vocab_path": "/bank/vocab/spm.model", "data.extra_ids": 0})
  assert (new.data.vocab_path, new.data.extra_ids) == ("/bank/vocab/spm.model", 0)
  assert (cfg.data.vocab_path, cfg.data.extra_ids) == ("", 100)
  assert new.is_locked
  with pytest.raises(KeyError, match="vocab_pth"):
    with_values(cfg, {"data.vocab_pth": "x"})  # a key that is not there, as on the command line
  with pytest.raises(TypeError):
    with_values(cfg, {"data.extra_ids": "many"})


def test_a_bank_vocabulary_and_pseudo_labels_change_a_copy(tmp_path):
  from modjax.methods.modular.pseudo_labels import with_labels
  from modjax.train import defaults, experiment

  cfg = defaults.lock(defaults.base_config())
  before = cfg.to_json()
  (tmp_path / "vocab").mkdir()
  (tmp_path / "vocab" / "spm.model").write_bytes(b"")
  run_cfg = experiment.with_bank_vocabulary(cfg, tmp_path)
  assert run_cfg.data.vocab_path == str(tmp_path / "vocab" / "spm.model")
  assert run_cfg.data.extra_ids == 0
  assert experiment.with_bank_vocabulary(run_cfg, tmp_path / "elsewhere") is run_cfg
  labelled = with_labels(run_cfg, {"train": "t.jsonl.gz", "validation": "v.jsonl.gz"})
  assert (labelled.data.task, labelled.data.train_files) == ("jsonl", "t.jsonl.gz")
  assert run_cfg.data.task == cfg.data.task and cfg.to_json() == before
