"""The method registry (modjax.core.registry) and the layer contracts that keep the trainer,
evaluate and the configs from naming a method (the method a bank records: tests/test_mom.py)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from modjax.core import registry
from modjax.core.errors import ConfigError
from modjax.train.defaults import base_config, with_method

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_method_is_registered_under_its_name():
  methods = registry.methods()
  assert sorted(methods) == ["baseline", "ffn_merge", "finetune", "modular", "mom"]
  for name, method in methods.items():
    assert method.name == name and callable(method.run)
  assert methods["mom"].bank_model is not None and methods["modular"].bank_model is None


def test_unknown_method_is_a_one_line_error_naming_the_known_ones():
  with pytest.raises(ConfigError, match=r"config.method='nope' is unknown; use one of \[.*'mom'"):
    registry.method("nope")


def test_with_method_adds_the_section_and_sets_the_method():
  c = with_method(base_config(), "modular")
  assert c.method == "modular" and "granularities" in c.modular
  assert with_method(base_config(), "finetune").method == "finetune"


def test_train_command_rejects_an_unknown_method_before_writing(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
    [sys.executable, "-m", "modjax.train", "--config", str(ROOT / "configs/tiny.py")]
    + [f"--config.workdir={workdir}", "--config.method=nope"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert result.returncode == 2, result.stderr
  assert "config.method='nope' is unknown" in result.stderr.strip().splitlines()[-1]
  assert not workdir.exists()


def test_import_contracts_hold():
  """No module imports a higher layer and the methods import none of each other
  ([tool.importlinter] in pyproject.toml)."""
  lint = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
  result = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-3000:]
  assert "0 broken" in result.stdout


def test_every_model_implements_the_interface_below_the_methods():
  """T5, GPT-2 and MoM's routed model are Architectures (what training, scoring and decoding
  call); the cost model prices T5 and GPT-2 (Priced) and refuses MoM's, which has its own."""
  from modjax.core.model_config import GPT2Config, T5Config
  from modjax.methods.mom.model import MoMGPT2
  from modjax.methods.mom.structure import MoMConfig
  from modjax.models import GPT2, T5
  from modjax.models.interface import Architecture, Priced

  t5, gpt2 = T5(T5Config()), GPT2(GPT2Config())
  mom = MoMGPT2(GPT2Config(n_layer=4), MoMConfig(num_attn=2, num_ffn=2, rounds=2))
  assert all(isinstance(m, Priced) for m in (t5, gpt2))
  assert isinstance(mom, Architecture) and not isinstance(mom, Priced)
  assert (t5.kind, gpt2.kind, mom.kind) == ("encdec", "lm", "lm")
