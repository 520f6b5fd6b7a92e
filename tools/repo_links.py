"""Stamps the repository setting into the notebooks and the README, or checks that they agree.

The one setting is `[project.urls] Repository` in pyproject.toml (a GitHub address). From it:
each notebook's first markdown cell carries an "Open in Colab" badge for that notebook, its
install cell clones `MODJAX_REPO` from it, and every Colab link in README.md points at it.

  python tools/repo_links.py           # rewrite what disagrees (nothing else changes)
  python tools/repo_links.py --check   # exit 1, naming the files, if anything disagrees

tests/test_repo_links.py runs the check in CI.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tomllib

import nbformat

BRANCH = "main"  # the branch the Colab links open
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
GITHUB = re.compile(r"https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?/?")
COLAB_LINK = re.compile(
  r"https://colab\.research\.google\.com/github/[^/\s()]+/[^/\s()]+/blob/[^/\s()]+/"
  r"(?P<path>[^\s()]+\.ipynb)"
)
BADGE_LINE = re.compile(r"^\[!\[Open in Colab\]\([^)]*\)\]\([^)]*\)\n*", re.MULTILINE)
REPO_LINE = re.compile(r'^MODJAX_REPO = "[^"]*"', re.MULTILINE)


class SettingError(ValueError):
  """The repository setting is missing or not a GitHub address."""


def repository(root: pathlib.Path) -> str:
  """The setting: `https://github.com/OWNER/NAME` from root/pyproject.toml."""
  with open(root / "pyproject.toml", "rb") as f:
    url = tomllib.load(f).get("project", {}).get("urls", {}).get("Repository", "")
  match = GITHUB.fullmatch(url)
  if not match:
    raise SettingError(
      f"pyproject.toml [project.urls] Repository is {url!r}; "
      "set it to a GitHub address, https://github.com/OWNER/NAME"
    )
  return f"https://github.com/{match[1]}/{match[2]}"


def colab_url(repo: str, path: str) -> str:
  """The Colab address that opens `path` (relative to the repository root) from `repo`."""
  owner_name = repo.removeprefix("https://github.com/")
  return f"https://colab.research.google.com/github/{owner_name}/blob/{BRANCH}/{path}"


def badge(repo: str, path: str) -> str:
  return f"[![Open in Colab]({BADGE})]({colab_url(repo, path)})"


def stamp_notebook(text: str, repo: str, path: str) -> str:
  """The notebook (its JSON text) with the badge and MODJAX_REPO set from `repo`."""
  nb = nbformat.reads(text, as_version=4)
  markdown = [c for c in nb.cells if c.cell_type == "markdown"]
  installs = [c for c in nb.cells if c.cell_type == "code" and REPO_LINE.search(c.source)]
  if not markdown or len(installs) != 1:
    raise SettingError(f"{path}: needs a markdown cell and one install cell setting MODJAX_REPO")
  first = markdown[0]
  body = BADGE_LINE.sub("", first.source)
  title, _, rest = body.partition("\n")
  if not title.startswith("# "):  # no title: the badge goes first
    title, rest = "", body
  rest = rest.lstrip("\n")
  first.source = "\n\n".join(part for part in (title, badge(repo, path), rest) if part)
  installs[0].source = REPO_LINE.sub(f'MODJAX_REPO = "{repo}"', installs[0].source)
  return nbformat.writes(nb) + "\n"


def stamp_readme(text: str, repo: str, root: pathlib.Path) -> str:
  """README.md with every Colab link pointing at `repo`; each must name a notebook that exists."""
  paths = [m["path"] for m in COLAB_LINK.finditer(text)]
  if not paths:
    raise SettingError("README.md has no Colab link (https://colab.research.google.com/github/...)")
  missing = [p for p in paths if not (root / p).is_file()]
  if missing:
    raise SettingError(f"README.md links notebooks that do not exist: {', '.join(missing)}")
  return COLAB_LINK.sub(lambda m: colab_url(repo, m["path"]), text)


def stamped(root: pathlib.Path) -> dict[pathlib.Path, tuple[str, str]]:
  """file -> (its text now, its text stamped from the setting), for the README and notebooks."""
  repo = repository(root)
  out = {}
  for file in sorted((root / "notebooks").glob("*.ipynb")):
    text = file.read_text()
    out[file] = (text, stamp_notebook(text, repo, file.relative_to(root).as_posix()))
  readme = root / "README.md"
  text = readme.read_text()
  out[readme] = (text, stamp_readme(text, repo, root))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a mismatch")
  parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path(__file__).parent.parent)
  args = parser.parse_args(argv)
  try:
    files = stamped(args.root)
  except (SettingError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stale = [file for file, (now, want) in files.items() if now != want]
  for file in stale:
    name = file.relative_to(args.root)
    if args.check:
      print(f"{name}: does not match the repository setting", file=sys.stderr)
    else:
      file.write_text(files[file][1])
      print(f"stamped {name}")
  if args.check and stale:
    print("fix: python tools/repo_links.py", file=sys.stderr)
  return 1 if args.check and stale else 0


if __name__ == "__main__":
  sys.exit(main())
