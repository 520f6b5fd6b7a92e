"""modjax: one bank of transformer modules, many static plans (JAX/Flax).

The package metadata (dependency ranges, extras) is in pyproject.toml; the tested set is
constraints.txt.
"""

from setuptools import setup

setup()
