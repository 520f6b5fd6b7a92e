"""Every notebook runs top to bottom on its tiny path (nbclient, a fresh kernel), writes its
figures, and is committed without outputs.

The kernel inherits this process's environment: ``MODJAX_NOTEBOOK_OUT`` points the notebook's
outputs (workdirs, figures) into pytest's tmp dir. As papermill does, ``QUICK`` overrides are
injected as a cell after the one tagged ``parameters``: fewer steps than a user's tiny run, the
same code path.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
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
