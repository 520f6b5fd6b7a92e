"""TensorFlow and seqio for the input pipeline only, imported quietly on first use.

Nothing in modjax imports TensorFlow (or seqio, which imports it) at module level: ``tf`` and
``seqio`` here stand for the real modules and import them the first time one of their attributes
is used, so the command-line programs start, and reject bad input, without loading TF. The import

* sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless it is set (TF's C++ INFO and WARNING lines off, errors
  on);
* hides every GPU from TensorFlow with ``tf.config.set_visible_devices([], "GPU")``: TF must never
  take an accelerator from JAX. We do *not* set ``CUDA_VISIBLE_DEVICES``: JAX reads it too, and
  setting it before JAX initialises its backend would hide the GPUs from training as well;
* drops TF's start-up chatter that the log level does not reach because TF prints it before its
  logging is initialised (the oneDNN notice, CUDA driver probing, and on a machine without a GPU
  the failed ``cuInit``). Every other line written to stderr meanwhile is passed on.

Modules that need TF write ``from modjax.data.tf_setup import seqio, tf`` and use them as the
modules; ``load()`` returns the real ones.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile

_NOISE = re.compile(
  r"All log messages before absl::InitializeLog|oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS"
  r"|cudart_stub|Could not find cuda drivers|failed call to cuInit|cpu_feature_guard"
  r"|rebuild TensorFlow with the appropriate compiler flags|Unable to register cu\w+ factory"
)


@functools.cache
def load() -> dict:
  """Imports TensorFlow (GPUs hidden) and seqio once; {"tensorflow": tf, "seqio": seqio}."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with _without_startup_noise():
    import tensorflow as tf

    try:
      tf.config.set_visible_devices([], "GPU")  # also where TF probes CUDA (cuInit)
    except RuntimeError:
      pass  # TF's runtime was already initialised by someone else; its device choice stands
    import seqio
  return {"tensorflow": tf, "seqio": seqio}


@contextlib.contextmanager
def _without_startup_noise():
  """Captures file descriptor 2 (C++ writes there directly) and passes on what is not noise."""
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no usable stderr: nothing to keep quiet
    yield
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode("utf-8", errors="replace")
      kept = [line for line in text.splitlines(keepends=True) if not _NOISE.search(line)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


class _Deferred:
  """Stands for the module ``name``; the first attribute lookup imports it (see ``load``)."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str):
    if attr == "_name":  # not set yet (copy/pickle build objects without __init__)
      raise AttributeError(attr)
    return getattr(load()[self._name], attr)

  def __repr__(self) -> str:
    return f"<{self._name}, imported on first use by modjax.data.tf_setup>"


tf = _Deferred("tensorflow")
seqio = _Deferred("seqio")

__all__ = ["load", "seqio", "tf"]
