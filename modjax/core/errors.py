"""The one base class of bad input, and the run config's own error.

Every error a user can fix (a config value, a flag, a file, a plan, a checkpoint that does not fit)
is a :class:`UserError`; its message names the problem and the fix in one line. The command-line
runner (``modjax.core.cli.run``) prints it as one ``error: ...`` line on stderr and exits with status 2,
with no traceback; anything else is a bug and keeps its traceback. Each error class also keeps the
built-in base it always had (``ValueError``, ``RuntimeError``), so ``except ValueError`` still
catches it. This module imports nothing from modjax: every layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input the user can fix; the message is one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key and the fix."""
