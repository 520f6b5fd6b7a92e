"""Every config file builds, is locked, validates, and documents its run command."""

import gzip
import importlib.util
import json
import os
import pathlib

import pytest

from modjax.train import experiment
from modjax.train.experiment import ConfigError, validate_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DDTP = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ddtp-summ"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _finetune_args():
  module = _load("t5_finetune")
  return [f"{task},{size}" for task in module.TASKS for size in module.SIZES]


# "{data}": a small jsonl corpus made by the test (the shared corpora may not be beside a checkout)
CASES = [("tiny", ""), ("ddtp_lm", "{data}"), ("ddtp_ende", "{data}")]
CASES += [("ddtp_lm", "{data},converged"), ("ddtp_ende", "{data},converged")]
CASES += [("t5_finetune", a) for a in _finetune_args()]
CASES += [("ffn_merge", "tiny,runs/merged")]
CASES += [("ffn_merge", f"{recipe},runs/merged,{{data}}") for recipe in ("lm", "ende")]


def write_corpus(directory: pathlib.Path, rows: list[dict]) -> str:
  """``train.jsonl.gz`` and ``validation.jsonl.gz`` holding ``rows``, as in ../shared/data."""
  directory.mkdir(parents=True, exist_ok=True)
  for split in ("train", "validation"):
    with gzip.open(directory / f"{split}.jsonl.gz", "wt") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(directory)


@pytest.mark.parametrize("name,arg", CASES)
def test_config_builds_locked_and_valid(name, arg, tmp_path):
  module = _load(name)
  assert "python -m modjax.train --config configs/" in module.__doc__
  corpus = [{"inputs": "a package description", "targets": "a synopsis"}]
  cfg = module.get_config(arg.format(data=write_corpus(tmp_path / "data", corpus)))
  with pytest.raises(AttributeError):
    cfg.train.no_such_key = 1  # locked: unknown keys are errors
  cfg.workdir = str(tmp_path)
  validate_config(cfg)


@pytest.mark.skipif(not DDTP.is_dir(), reason="the ddtp-summ corpus is not beside this checkout")
def test_ddtp_config_points_at_the_corpus(tmp_path):
  cfg = _load("ddtp_summ").get_config(str(DDTP))
  cfg.workdir = str(tmp_path)
  validate_config(cfg)
  assert os.path.isfile(cfg.data.train_files)


def test_lm_config_models_the_descriptions_not_the_synopses(tmp_path):
  rows = [
    {"inputs": f"package {i} gives tools for editing text files", "targets": f"tool {i}"}
    for i in range(40)
  ]
  cfg = _load("ddtp_lm").get_config(write_corpus(tmp_path, rows))
  cfg.workdir = str(tmp_path / "run")
  cfg.data.vocab_size = 36
  vocabulary = experiment.build_vocabulary(cfg)
  task = experiment.build_task(cfg, vocabulary)
  dataset = task.get_dataset({"targets": 64}, split="validation", shuffle=False)
  example = next(dataset.as_numpy_iterator())
  assert vocabulary.decode(example["targets"][:-1].tolist()) == rows[0]["inputs"]


def test_finetune_config_rejects_unknown_task():
  with pytest.raises(ValueError, match="unknown task"):
    _load("t5_finetune").get_config("imagenet,t5-small")


def test_empty_workdir_is_an_error():
  cfg = _load("tiny").get_config("")
  with pytest.raises(ConfigError, match="workdir"):
    validate_config(cfg)


def test_load_config_reads_a_config_spec_like_the_config_flag(tmp_path):
  from modjax.train.defaults import load_config

  c = load_config(f"{CONFIGS / 'ffn_merge.py'}:tiny,{tmp_path / 'merged'}")
  assert c.method == "ffn_merge" and c.ffn_merge.bank == str(tmp_path / "merged")
  assert load_config(CONFIGS / "tiny.py").model.preset == "tiny"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_config(tmp_path / "absent.py")


@pytest.mark.parametrize(
  "name,window", [("ddtp_lm", 3_000), ("ddtp_ende", 750), ("ddtp_summ", 1_500)]
)
def test_converged_originals_validate_and_stop_at_a_plateau(name, window, tmp_path):
  data = write_corpus(tmp_path / "data", [{"inputs": "a description", "targets": "a synopsis"}])
  mode = "6" if name == "ddtp_summ" else "converged"
  t = _load(name).get_config(f"{data},{mode}").train
  assert (t.plateau_window, t.plateau_min_improvement, t.eval_max_examples) == (window, 0.01, 0)
  assert t.num_steps == 30_000 and t.eval_every > 0


@pytest.mark.parametrize("name", ["ddtp_lm", "ddtp_ende"])
def test_an_unknown_original_mode_is_refused(name, tmp_path):
  data = write_corpus(tmp_path / "data", [{"inputs": "a description", "targets": "a synopsis"}])
  with pytest.raises(ValueError, match="unknown mode 'fast'"):
    _load(name).get_config(f"{data},fast")
