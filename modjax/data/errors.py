"""The one exception type of the data layer.

Every problem with user input (a missing file, a malformed line, a wrong vocabulary size, an
unknown task name, a batch size that does not divide the process count) raises `DataError` with a
one-line message that names the problem and the fix.
"""

from modjax.core.errors import UserError


class DataError(UserError, ValueError):
  """Bad data-layer input; the message names the problem and how to fix it."""
