"""Imports TensorFlow for the input pipeline only: TF must never take an accelerator from JAX.

We hide every GPU from TensorFlow with `tf.config.set_visible_devices([], "GPU")`. We do *not* set
`CUDA_VISIBLE_DEVICES` here: that variable is read by JAX as well, and setting it when the data
layer is imported before JAX initialises its backend would hide the GPUs from training too.
"""

import os

# TF's C++ start-up chatter (oneDNN, CUDA probing) is noise for a data pipeline; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def _hide_gpus_from_tensorflow() -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # TF's runtime was already initialised by someone else; its device choice stands.
    pass


_hide_gpus_from_tensorflow()

__all__ = ["tf"]
