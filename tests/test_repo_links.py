"""The notebooks' "Open in Colab" badges and clone address and the README's Colab links all come
from one setting, `[project.urls] Repository` in pyproject.toml (tools/repo_links.py stamps them).
"""

import importlib.util
import pathlib
import re
import shutil

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("repo_links", ROOT / "tools" / "repo_links.py")
repo_links = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repo_links)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_notebooks_and_readme_agree_with_the_setting():
  assert repo_links.main(["--check", "--root", str(ROOT)]) == 0
  repo = repo_links.repository(ROOT)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    first_markdown = next(c for c in nb.cells if c.cell_type == "markdown")
    assert repo_links.colab_url(repo, f"notebooks/{path.name}") in first_markdown.source
    assert f'MODJAX_REPO = "{repo}"' in nb.cells[1].source, f"{path.name}: install cell"
  readme = (ROOT / "README.md").read_text()
  for path in NOTEBOOKS:
    assert repo_links.colab_url(repo, f"notebooks/{path.name}") in readme


def _copy(tmp_path: pathlib.Path, repository: str) -> pathlib.Path:
  """A copy of the files the tool reads and writes, with `repository` as the setting."""
  (tmp_path / "notebooks").mkdir()
  for path in NOTEBOOKS:
    shutil.copy(path, tmp_path / "notebooks")
  shutil.copy(ROOT / "README.md", tmp_path)
  pyproject = (ROOT / "pyproject.toml").read_text()
  pyproject, n = re.subn(
    r'^Repository = ".*"$', f'Repository = "{repository}"', pyproject, flags=re.M
  )
  assert n == 1
  (tmp_path / "pyproject.toml").write_text(pyproject)
  return tmp_path


def test_a_new_setting_restamps_the_links_and_nothing_else(tmp_path):
  old = repo_links.repository(ROOT).removeprefix("https://github.com/")
  root = _copy(tmp_path, "https://github.com/acme/modjax-fork.git")
  assert repo_links.main(["--check", "--root", str(root)]) == 1
  assert repo_links.main(["--root", str(root)]) == 0
  assert repo_links.main(["--check", "--root", str(root)]) == 0
  for path in [*NOTEBOOKS, ROOT / "README.md"]:
    stamped = (root / path.relative_to(ROOT)).read_text()
    assert "/github/acme/modjax-fork/blob/main/notebooks/" in stamped
    assert stamped.replace("acme/modjax-fork", old) == path.read_text(), path.name
  install_cell = nbformat.read(root / "notebooks" / NOTEBOOKS[0].name, as_version=4).cells[1]
  assert 'MODJAX_REPO = "https://github.com/acme/modjax-fork"' in install_cell.source


def test_a_notebook_without_a_badge_gets_one_under_its_title(tmp_path):
  root = _copy(tmp_path, "https://github.com/acme/modjax-fork")
  path = root / "notebooks" / NOTEBOOKS[0].name
  nb = nbformat.read(path, as_version=4)
  title, _, rest = repo_links.BADGE_LINE.sub("", nb.cells[0].source).partition("\n")
  nb.cells[0].source = f"{title}\n{rest}"
  path.write_text(nbformat.writes(nb) + "\n")
  assert repo_links.main(["--root", str(root)]) == 0
  source = nbformat.read(path, as_version=4).cells[0].source
  link = repo_links.colab_url("https://github.com/acme/modjax-fork", f"notebooks/{path.name}")
  assert source.split("\n\n")[:2] == [title, f"[![Open in Colab]({repo_links.BADGE})]({link})"]


def test_a_setting_that_is_not_a_github_address_is_refused(tmp_path, capsys):
  root = _copy(tmp_path, "gitlab.com/acme/modjax")
  before = {p: p.read_text() for p in root.rglob("*") if p.is_file()}
  assert repo_links.main(["--root", str(root)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    "error: pyproject.toml [project.urls] Repository is 'gitlab.com/acme/modjax'; "
    "set it to a GitHub address, https://github.com/OWNER/NAME"
  ]
  assert {p: p.read_text() for p in root.rglob("*") if p.is_file()} == before
