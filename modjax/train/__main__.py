"""``python -m modjax.train --config configs/<x>.py[:arg] [--config.key=value ...]``"""

import logging
import sys

from modjax.core import cli, registry
from modjax.train import experiment
from modjax.train.reporting import NonFiniteLossError

log = logging.getLogger("modjax.train")


def run_method(config):
  """The training the config's ``method`` names, looked up in ``modjax.core.registry``."""
  return registry.method(config.method).run(config)


def main(config):
  try:
    result = run_method(config)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  finally:
    experiment.shutdown_distributed(config)
  if result is None:  # a method that trains nothing (layer drop) only writes its bank
    log.info("wrote %s", config.workdir)
    return
  log.info("finished at step %d; outputs in %s", result.last_step, config.workdir)


if __name__ == "__main__":
  cli.run(main)
