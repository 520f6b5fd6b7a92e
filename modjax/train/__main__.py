"""``python -m modjax.train --config configs/<x>.py[:arg] [--config.key=value ...]``"""

import logging
import sys

from modjax import cli
from modjax.train.experiment import ConfigError
from modjax.train.loop import NonFiniteLossError, train

log = logging.getLogger("modjax.train")


def run_method(config):
  """The training the config's ``method`` names (methods sit above the training loop)."""
  if config.method == "finetune":
    return train(config)
  if config.method == "modular":
    from modjax.methods.modular.run import train_bank

    return train_bank(config)
  if config.method == "baseline":
    from modjax.methods import baselines

    return baselines.run(config)
  if config.method == "ffn_merge":
    from modjax.methods.ffn_merge.run import recover

    return recover(config)
  if config.method == "mom":
    from modjax.methods.mom.run import train_mom

    return train_mom(config)
  raise ConfigError(
    f"config.method={config.method!r} is unknown; use 'finetune', 'modular', 'baseline', "
    "'ffn_merge' or 'mom'"
  )


def main(config):
  try:
    result = run_method(config)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  if result is None:  # a method that trains nothing (layer drop) only writes its bank
    log.info("wrote %s", config.workdir)
    return
  log.info("finished at step %d; outputs in %s", result.last_step, config.workdir)


if __name__ == "__main__":
  cli.run(main)
