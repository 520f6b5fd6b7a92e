"""Architectures: pure functions of (bank parameters, plan, inputs)."""

from modjax.core.model_config import GPT2Config, T5Config
from modjax.models.gpt2 import GPT2
from modjax.models.t5 import T5


def architecture_for(config: T5Config | GPT2Config) -> T5 | GPT2:
  if isinstance(config, T5Config):
    return T5(config)
  if isinstance(config, GPT2Config):
    return GPT2(config)
  raise TypeError(f"no architecture for config type {type(config).__name__}")


__all__ = ["GPT2", "T5", "architecture_for"]
