"""``python -m modjax.train --config configs/<x>.py[:arg] [--config.key=value ...]``"""

import logging
import sys

from modjax import cli
from modjax.train.loop import NonFiniteLossError, train

cli.define_config_flag()
log = logging.getLogger("modjax.train")


def main(config):
  try:
    result = train(config)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  log.info("finished at step %d; outputs in %s", result.last_step, config.workdir)


if __name__ == "__main__":
  cli.run(main)
