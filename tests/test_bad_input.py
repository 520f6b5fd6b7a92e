"""Bad configs, flags, data files and checkpoints given to ``python -m modjax.train`` (and
``modjax.evaluate``): each run exits with code 2 and exactly one ``error:`` line on stderr that
names the problem, prints no Python traceback, leaves every file that existed before it (workdir,
data files, checkpoints) byte-identical and creates no file or directory: everything that can be
checked is checked before anything is written.

To stay fast, the cases run through one interpreter that imports modjax once and runs each case's
``python -m modjax.train ...`` in a fork of itself (``train_helpers.run_cli_cases``); one case is
also run as a plain subprocess to show that the two agree.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest
from train_helpers import (
  REPO,
  TRACEBACK,
  kill,
  micro_flags,
  start_module,
  subprocess_env,
)

TRAIN = "modjax.train"
EVALUATE = "modjax.evaluate"
REAL_SUBPROCESS_CASE = "bad_json_line"
DRIVER_TIMEOUT_S = 300


def _write(path, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _jsonl(path, bad_line: str | None = None, bad_at: int = 3) -> str:
  lines = [
    json.dumps({"inputs": f"article {i} about cats.", "targets": f"cats {i}."}) for i in range(6)
  ]
  if bad_line is not None:
    lines[bad_at - 1] = bad_line
  return _write(path, "\n".join(lines) + "\n")


BERT_CONFIG = json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})


def _hf_dir(case_dir, files: dict[str, str]) -> str:
  """A would-be save_pretrained directory holding ``files``."""
  for name, text in files.items():
    _write(f"{case_dir}/hf/{name}", text)
  return f"{case_dir}/hf"


def _jsonl_task(case_dir, bad_line: str, bad_at: int) -> list[str]:
  path = _jsonl(f"{case_dir}/data/train.jsonl", bad_line, bad_at)
  return ["--config.data.task=jsonl", f"--config.data.train_files={path}"]


@dataclasses.dataclass(frozen=True)
class Bare:
  """A case's whole command line, without the micro flags: ``args(case_dir) -> argv``."""

  args: Callable[[str], list[str]]


def _config_file(name: str, text: str | None, *overrides: str) -> Bare:
  """``--config <case dir>/<name>`` holding ``text`` (None: the file does not exist)."""

  def args(case_dir):
    path = os.path.join(case_dir, name) if text is None else _write(f"{case_dir}/{name}", text)
    return ["--config", path, *[o.format(workdir=f"{case_dir}/workdir") for o in overrides]]

  return Bare(args)


SYNTAX_ERROR = "def get_config(:\n  return None\n"
RAISES = "def get_config():\n  raise RuntimeError('no such experiment')\n"
WORKDIR_OVERRIDE = "--config.workdir={workdir}"

# (id, module, extra args after the micro flags, a function (case dir) -> them, or a Bare command
# line, keywords the error line must contain). Files a case needs are written into its own
# directory. Every case exits with code 2 (bad input).
CASES = [
  ("unknown_config_key", TRAIN, ["--config.train.nope=1"], ["unknown config key", "train.nope"]),
  ("wrong_value_type", TRAIN, ["--config.train.batch_size=abc"], ["batch_size", "abc"]),
  ("wrong_bool_value", TRAIN, ["--config.data.pack=maybe"], ["pack", "maybe"]),
  ("negative_num_steps", TRAIN, ["--config.train.num_steps=-5"], ["train.num_steps", "-5"]),
  ("zero_batch_size", TRAIN, ["--config.train.batch_size=0"], ["train.batch_size"]),
  (
    "batch_not_divisible_by_data_parallel",
    TRAIN,
    ["--config.train.batch_size=6", "--config.mesh.data=4", "--config.mesh.fsdp=2"],
    ["batch 6", "data-parallel size 8"],
  ),
  (
    "microbatches_do_not_divide_batch",
    TRAIN,
    ["--config.train.num_microbatches=3"],
    ["num_microbatches", "batch_size=8"],
  ),
  ("mesh_product_not_device_count", TRAIN, ["--config.mesh.data=3"], ["mesh", "3", "8"]),
  ("too_many_devices", TRAIN, ["--config.mesh.num_devices=99"], ["mesh.num_devices=99"]),
  ("dcn_slices_not_there", TRAIN, ["--config.mesh.dcn_data=2"], ["mesh.dcn_data=2", "form 1"]),
  ("unknown_optimizer", TRAIN, ["--config.optimizer.name=sgd"], ["optimizer.name", "sgd"]),
  ("unknown_schedule", TRAIN, ["--config.optimizer.schedule=step"], ["optimizer.schedule"]),
  (
    "negative_learning_rate",
    TRAIN,
    ["--config.optimizer.learning_rate=-0.1"],
    ["optimizer.learning_rate"],
  ),
  ("unknown_model_preset", TRAIN, ["--config.model.preset=t5-huge"], ["model.preset", "t5-huge"]),
  ("unknown_dtype", TRAIN, ["--config.model.dtype=float8"], ["model.dtype", "float8"]),
  ("unknown_task", TRAIN, ["--config.data.task=imagenet"], ["data.task", "imagenet"]),
  ("jsonl_task_without_files", TRAIN, ["--config.data.task=jsonl"], ["jsonl", "train_files"]),
  (
    "missing_data_file",
    TRAIN,
    lambda d: ["--config.data.task=jsonl", f"--config.data.train_files={d}/absent.jsonl"],
    ["data.train_files", "absent.jsonl"],
  ),
  ("bad_json_line", TRAIN, lambda d: _jsonl_task(d, "{oops", 3), ["train.jsonl", "line 3", "JSON"]),
  (
    "jsonl_line_without_targets",
    TRAIN,
    lambda d: _jsonl_task(d, json.dumps({"inputs": "x"}), 2),
    ["train.jsonl", "line 2", "targets"],
  ),
  (
    "tsv_line_without_tab",
    TRAIN,
    lambda d: [
      "--config.data.task=tsv",
      "--config.data.train_files=" + _write(f"{d}/data/t.tsv", "a\tb\nno tab here\n"),
    ],
    ["t.tsv", "line 2", "columns"],
  ),
  (
    "empty_data_file",
    TRAIN,
    lambda d: [
      "--config.data.task=jsonl",
      "--config.data.train_files=" + _write(f"{d}/e.jsonl", ""),
    ],
    ["e.jsonl", "no examples"],
  ),
  (
    "vocab_path_does_not_exist",
    TRAIN,
    lambda d: [f"--config.data.vocab_path={d}/spm.model"],
    ["data.vocab_path", "spm.model"],
  ),
  (
    "vocab_is_not_sentencepiece",
    TRAIN,
    lambda d: [f"--config.data.vocab_path={_write(f'{d}/vocab.model', 'not a model')}"],
    ["vocab.model", "SentencePiece"],
  ),
  (
    "init_from_without_config_json",
    TRAIN,
    lambda d: [f"--config.model.init_from={_hf_dir(d, {'README.md': 'no config'})}"],
    ["config.json"],
  ),
  (
    "init_from_unsupported_architecture",
    TRAIN,
    lambda d: [f"--config.model.init_from={_hf_dir(d, {'config.json': BERT_CONFIG})}"],
    ["unsupported architecture", "BertForMaskedLM"],
  ),
  ("unexpected_positional_argument", TRAIN, ["extra"], ["unexpected", "extra"]),
  ("empty_workdir", TRAIN, ["--config.workdir="], ["workdir"]),
  ("missing_config_flag", TRAIN, Bare(lambda d: []), ["--config is required"]),
  ("evaluate_missing_config_flag", EVALUATE, Bare(lambda d: []), ["--config is required"]),
  ("overrides_without_config_flag", TRAIN, "no_config", ["config.workdir"]),
  ("misspelt_config_section", TRAIN, ["--config.trian.batch_size=4"], ["trian", "train"]),
  # The --config file is missing, does not compile or raises, with and without overrides (the
  # file is loaded while the flags are parsed, not on the first override).
  (
    "config_file_does_not_exist",
    TRAIN,
    _config_file("nope.py", None, WORKDIR_OVERRIDE),
    ["nope.py", "not found"],
  ),
  (
    "config_file_does_not_exist_bare",
    TRAIN,
    _config_file("nope.py", None),
    ["nope.py", "not found"],
  ),
  (
    "evaluate_config_file_does_not_exist",
    EVALUATE,
    _config_file("nope.py", None, WORKDIR_OVERRIDE),
    ["nope.py", "not found"],
  ),
  (
    "evaluate_config_file_does_not_exist_bare",
    EVALUATE,
    _config_file("nope.py", None),
    ["nope.py", "not found"],
  ),
  (
    "config_file_syntax_error",
    TRAIN,
    _config_file("syn.py", SYNTAX_ERROR),
    ["syn.py", "SyntaxError"],
  ),
  (
    "evaluate_config_file_syntax_error",
    EVALUATE,
    _config_file("syn.py", SYNTAX_ERROR),
    ["syn.py", "SyntaxError"],
  ),
  (
    "get_config_raises",
    TRAIN,
    _config_file("raises.py", RAISES),
    ["raises.py", "RuntimeError", "no such experiment"],
  ),
  (
    "evaluate_get_config_raises",
    EVALUATE,
    _config_file("raises.py", RAISES, WORKDIR_OVERRIDE),
    ["raises.py", "RuntimeError", "no such experiment"],
  ),
  ("evaluate_without_checkpoint", EVALUATE, [], ["no checkpoint", "train first"]),
  # Resuming a micro checkpoint with the tiny preset: d_model 64 vs 128.
  (
    "checkpoint_shape_mismatch",
    TRAIN,
    ["--config.model.preset=tiny"],
    ["tensor '", "checkpoints/30", "but the abstract state asks for"],
  ),
]
CASE_IDS = [case[0] for case in CASES]
assert len(set(CASE_IDS)) == len(CASES), "case ids must be unique (results are keyed by id)"


def _args_for(case_dir, extra) -> list[str]:
  workdir = os.path.join(case_dir, "workdir")
  if isinstance(extra, Bare):
    return extra.args(case_dir)
  if extra == "no_config":  # overrides, but no --config
    return [f"--config.workdir={workdir}", "--config.train.num_steps=5"]
  extra = extra(case_dir) if callable(extra) else extra
  return micro_flags(workdir) + extra


def _snapshot(directory) -> dict[str, str]:
  """{path relative to ``directory``: sha256 of a file's bytes, or "dir"} of everything below."""
  files = {}
  for root, dirs, names in os.walk(directory):
    files.update({os.path.relpath(os.path.join(root, d), directory): "dir" for d in dirs})
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


@pytest.fixture(scope="module")
def cases(tmp_path_factory, micro_run):
  """Prepares every case's directory, runs all cases, returns {id: (result, dir, snapshot)}."""
  root = tmp_path_factory.mktemp("bad_input")
  prepared = []
  for case_id, module, extra, _ in CASES:
    case_dir = root / case_id
    workdir = case_dir / "workdir"
    workdir.mkdir(parents=True)
    (workdir / "notes.txt").write_bytes(os.urandom(64))  # a user's file that must survive
    if case_id == "checkpoint_shape_mismatch":  # a trained micro workdir (latest step 30)
      ignore = shutil.ignore_patterns("eval")  # other tests write there meanwhile
      shutil.copytree(micro_run[0].workdir, workdir, ignore=ignore, dirs_exist_ok=True)
    args = _args_for(str(case_dir), extra)
    prepared.append(
      dict(
        id=case_id,
        module=module,
        args=args,
        stdout_path=str(root / f"{case_id}.out"),
        stderr_path=str(root / f"{case_id}.err"),
      )
    )
  snapshots = {case["id"]: _snapshot(root / case["id"]) for case in prepared}
  cases_path, results_path = root / "cases.json", root / "results.json"
  cases_path.write_text(json.dumps(prepared))
  # One case also runs as a plain `python -m` subprocess, alongside the driver.
  (real_case,) = [c for c in prepared if c["id"] == REAL_SUBPROCESS_CASE]
  with open(root / "real.out", "w") as out, open(root / "real.err", "w") as err:
    real = start_module(real_case["module"], real_case["args"], stdout=out, stderr=err)
  try:
    driver = [sys.executable, os.path.join(REPO, "tests", "train_helpers.py"), "cli-cases"]
    done = subprocess.run(
      [*driver, str(cases_path), str(results_path)],
      cwd=REPO,
      env=subprocess_env(8),
      capture_output=True,
      text=True,
      timeout=DRIVER_TIMEOUT_S,
    )
    real_code = real.wait(timeout=DRIVER_TIMEOUT_S)
  finally:
    kill(real)
  assert done.returncode == 0, done.stderr[-3000:]
  results = {r["id"]: r for r in json.loads(results_path.read_text())}
  results["real_subprocess"] = {
    "id": REAL_SUBPROCESS_CASE,
    "code": real_code,
    "stderr": (root / "real.err").read_text(),
  }
  return {
    case_id: (result, root / result["id"], snapshots[result["id"]])
    for case_id, result in results.items()
  }


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case_id,keywords", [(c[0], c[3]) for c in CASES], ids=CASE_IDS)
def test_bad_input_gives_one_error_line_and_changes_nothing(cases, case_id, keywords):
  result, case_dir, before = cases[case_id]
  stderr = result["stderr"]
  assert result["code"] == 2, f"exit code {result['code']}\n{stderr[-3000:]}"
  assert TRACEBACK not in stderr, stderr[-3000:]
  errors = _error_lines(stderr)
  assert len(errors) == 1, f"expected one error: line, got {errors}\n{stderr[-3000:]}"
  for keyword in keywords:
    assert keyword in errors[0], f"{keyword!r} not in {errors[0]!r}"
  after = _snapshot(case_dir)
  changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
  assert not changed, f"pre-existing files changed or removed: {changed}"
  created = sorted(set(after) - set(before))
  assert not created, f"a rejected run created {created}"


def test_checkpoint_is_untouched_by_a_mismatched_resume(cases):
  result, case_dir, before = cases["checkpoint_shape_mismatch"]
  checkpoint_files = [name for name in before if name.startswith("workdir/checkpoints/")]
  assert any(name.startswith("workdir/checkpoints/30/") for name in checkpoint_files)
  assert _snapshot(case_dir / "workdir" / "checkpoints") == {
    name[len("workdir/checkpoints/") :]: digest
    for name, digest in before.items()
    if name.startswith("workdir/checkpoints/")
  }
  (error,) = _error_lines(result["stderr"])
  assert error.count("float32[") == 2, error  # the saved and the requested shape


TF_STARTUP_NOISE = (
  "cuInit",
  "oneDNN",
  "TF_ENABLE_ONEDNN_OPTS",
  "cuda drivers",
  "absl::InitializeLog",
)


def test_a_real_subprocess_prints_no_tensorflow_startup_noise(cases):
  """The real subprocess reads a data file, so it imports TensorFlow (the forking driver imported
  it before forking): its stderr starts with modjax's error line, without TF's start-up lines."""
  real, _, _ = cases["real_subprocess"]
  lines = real["stderr"].splitlines()
  noise = [line for line in lines if any(word in line for word in TF_STARTUP_NOISE)]
  assert not noise, real["stderr"][-3000:]
  assert lines and lines[0].startswith("error: data file"), real["stderr"][-3000:]


def test_a_real_subprocess_agrees_with_the_forking_driver(cases):
  """The driver runs modules as the interpreter does: same exit code and error line."""
  forked, _, _ = cases[REAL_SUBPROCESS_CASE]
  real, _, _ = cases["real_subprocess"]
  assert real["code"] == forked["code"] == 2
  assert TRACEBACK not in real["stderr"]
  assert len(_error_lines(real["stderr"])) == 1
  assert _error_lines(real["stderr"]) == _error_lines(forked["stderr"])
