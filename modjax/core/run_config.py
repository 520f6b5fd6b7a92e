"""Run configs (ml_collections ``ConfigDict``) as values: library code never changes the config it
was given. Where a run needs different settings (a bank's vocabulary, labelled files, a continued
schedule), it takes a changed copy, :func:`with_values`, and passes that on."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections


def with_values(cfg: ml_collections.ConfigDict, values: Mapping[str, Any]):
  """A copy of ``cfg`` with each dotted key of ``values`` (``{"data.vocab_path": path}``) set;
  ``cfg`` is left as it was. As with ``--config.key=value``, the keys must exist and each value
  must fit its field's type; the copy is locked as ``cfg`` was."""
  new = copy.deepcopy(cfg)
  for dotted, value in values.items():
    *sections, key = dotted.split(".")
    node = new
    for name in sections:
      node = node[name]
    node[key] = value
  return new
