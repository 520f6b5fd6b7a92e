"""What the training loop records through clu (``modjax.train.reporting``): the JSONL writer is a
clu MetricWriter, and a micro run with the profiler hook on writes a jax.profiler trace into the
TensorBoard directory beside the scalars, with the progress line and every step's record; a trace
the run outlives is closed when training ends."""

import glob
import json
import logging
import os

import pytest
from etils import epath
from train_helpers import micro_config

from modjax.train import experiment
from modjax.train.clu_hooks import JsonlWriter
from modjax.train.experiment import ConfigError
from modjax.train.loop import train


def test_jsonl_writer_appends_scalar_lines_and_refuses_other_kinds(tmp_path):
  from clu import metric_writers

  path = epath.Path(tmp_path) / "metrics" / "train.jsonl"
  writer = JsonlWriter(path)
  assert isinstance(writer, metric_writers.MetricWriter)
  writer.write_scalars(1, {"loss": 2.5, "tokens": 64.0})
  writer.write_scalars(2, {"loss": 2.25, "tokens": 64.0})
  with pytest.raises(NotImplementedError, match="holds scalars only"):
    writer.write_texts(2, {"note": "text"})
  writer.close()
  JsonlWriter(path).close()  # reopening appends; nothing is truncated
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert records == [
    {"step": 1, "loss": 2.5, "tokens": 64.0},
    {"step": 2, "loss": 2.25, "tokens": 64.0},
  ]


def _trace_files(workdir) -> list[str]:
  pattern = os.path.join(str(workdir), "tensorboard", "plugins", "profile", "*", "*.xplane.pb")
  return glob.glob(pattern)


def test_profiler_hook_writes_a_trace_when_enabled(tmp_path, caplog):
  cfg = micro_config(
    tmp_path,
    mesh__num_devices=1,
    train__num_steps=6,
    train__log_every=3,
    train__profile_steps=2,
    train__profile_start=2,
  )
  with caplog.at_level(logging.INFO, logger="modjax"):
    result = train(cfg)
  (trace,) = _trace_files(tmp_path)
  assert os.path.getsize(trace) > 0
  assert any("profile written under" in m for m in caplog.messages), caplog.messages
  progress = [m for m in caplog.messages if m.startswith(("step 3/6", "step 6/6"))]
  assert len(progress) == 2 and all("tokens/s  ETA " in m for m in progress), caplog.messages
  with open(os.path.join(cfg.workdir, "metrics", "train.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, 7))
  assert sorted(result.losses) == list(range(1, 7))


def test_a_trace_the_run_outlives_is_stopped_when_training_ends(tmp_path):
  cfg = micro_config(
    tmp_path,
    mesh__num_devices=1,
    train__num_steps=3,
    train__profile_steps=10,
    train__profile_start=1,
  )
  train(cfg)
  assert len(_trace_files(tmp_path)) == 1  # 2 of the 10 steps traced, then the trace was closed


@pytest.mark.parametrize(
  "override, key",
  [
    (dict(train__profile_steps=-1), "train.profile_steps"),
    (dict(train__profile_steps=2, train__profile_start=0), "train.profile_start"),
  ],
)
def test_bad_profile_settings_are_one_line_errors(tmp_path, override, key):
  with pytest.raises(ConfigError, match=key):
    experiment.validate_config(micro_config(tmp_path, **override))
