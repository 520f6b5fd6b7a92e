"""Training methods by name: what ``config.method`` may say.

A method is a :class:`Method` (its name, the config section its defaults add, the function that
trains it, and, where its banks need more than their architecture to run, a bank reader) that the
package declares under the ``modjax.methods`` entry-point group (``pyproject.toml``). The trainer,
``evaluate`` and the configs look methods up here by name and never import one, so the layers
below ``modjax.methods`` stay below it, and a method from another package registers the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from modjax.core.errors import ConfigError

GROUP = "modjax.methods"


@dataclasses.dataclass(frozen=True)
class Method:
  """``run(cfg)`` trains (returns the loop's result, or None for a method that only writes a
  bank); ``add_defaults(cfg)`` adds the method's config section to a base config;
  ``bank_model(model, meta)``, where given, is the model that runs a bank this method wrote
  (``model.json``'s architecture and ``entries.json``'s metadata), else the architecture runs
  it with a plan."""

  name: str
  run: Callable[[Any], Any]
  add_defaults: Callable[[Any], Any] | None = None
  bank_model: Callable[[Any, Mapping], Any] | None = None


@functools.cache
def methods() -> dict[str, Method]:
  """Every registered method, loaded once."""
  found = {}
  for entry in metadata.entry_points(group=GROUP):
    method = entry.load()
    if not isinstance(method, Method) or method.name != entry.name:
      raise TypeError(f"entry point {entry.value} ({GROUP}) is not a Method named {entry.name!r}")
    found[entry.name] = method
  return found


def method(name: str) -> Method:
  """The registered method ``name``, or a one-line error listing the known ones."""
  known = methods()
  if name not in known:
    hint = (
      f"use one of {sorted(known)}"
      if known
      else "none is registered: install modjax (pip install -e .) so its entry points exist"
    )
    raise ConfigError(f"config.method={name!r} is unknown; {hint}")
  return known[name]


def bank_model(method_name: str | None, model, meta: Mapping):
  """The model that runs a stored bank: the reader of the method its ``model.json`` records,
  else the architecture itself (no reader, or a bank from before methods were recorded)."""
  if method_name is None:
    return model
  if method_name not in methods():
    raise ConfigError(
      f"the bank was written by method {method_name!r}, which is not installed here; "
      f"install the package that registers it (known: {sorted(methods())})"
    )
  reader = methods()[method_name].bank_model
  return model if reader is None else reader(model, meta)
