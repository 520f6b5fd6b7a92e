"""Result files: one way for every result writer of the library to write a file (atomically), and
how ``modjax.evaluate`` names what it writes.

:func:`write_atomically` writes through a temporary file in the target's directory, then renames
it over the target, so a reader (or a rerun after a crash) finds the previous file or the new one,
never part of one. ``modjax.evaluate``, the assembly sweep (``sweep.json``, ``sweep.md``), the
assembly records and ``merge.json`` all write through it.

An evaluation is identified by a record of everything that changes its numbers
(:func:`evaluation_record`): the bank or Hugging Face directory scored (kind, absolute path, step),
the plan (name, contents), the data (task, split, each file's path and SHA-256, or the pinned TFDS
name and version; prefix, JSON fields, vocabulary) and the settings (metrics, example limit,
lengths, decoding mode, beams, new tokens, BLEU tokenizer, draft; dtypes of an HF import). A
digest of that record ends the name of every result file (:func:`result_stem`), so two different
evaluations never share a file and a rerun of the same one finds its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable

from etils import epath

from modjax.core.plan import Plan
from modjax.data import sources, tasks

DIGEST_CHARS = 10  # 40 bits: a collision is still caught by comparing the stored record
LABEL_CHARS = 40


# ---- atomic writes -----------------------------------------------------------------------------


def write_atomically(path, chunks: Iterable[str]) -> None:
  """Writes the text ``chunks`` to ``path`` (local or gs://) through ``.<name>.tmp-<random>`` in
  the same directory, flushed and fsynced, then renamed over ``path``. Anything raised while the
  chunks are made or written removes the temporary file and leaves ``path`` as it was; a killed
  process may leave the hidden temporary file behind, never a half-written ``path``."""
  path = epath.Path(path)
  temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    if _is_local(path):
      with open(os.fspath(temporary), "x", encoding="utf-8") as f:
        for chunk in chunks:
          f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
      os.replace(os.fspath(temporary), os.fspath(path))
      _sync_directory(path.parent)
    else:  # an object store: the renamed object appears whole
      with temporary.open("w") as f:
        for chunk in chunks:
          f.write(chunk)
      temporary.replace(path)
  except BaseException:
    with contextlib.suppress(OSError):
      temporary.unlink(missing_ok=True)
    raise


def write_text_atomically(path, text: str) -> None:
  """:func:`write_atomically` of one text."""
  write_atomically(path, [text])


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _sync_directory(directory: epath.Path) -> None:
  """Makes the rename itself durable (best effort: not every file system allows it)."""
  with contextlib.suppress(OSError):
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


# ---- what an evaluation is ---------------------------------------------------------------------


def evaluation_record(scored, *, data: dict, settings: dict) -> dict:
  """The identity of an evaluation of ``scored`` (a ``modjax.eval_inputs.Scored``) on ``data``
  (:func:`data_record`) with ``settings`` (the values that change its numbers); JSON values only,
  so it reads back equal from a metrics file."""
  return {
    "bank": {"kind": scored.kind, "path": _absolute(scored.origin), "step": scored.step},
    "plan": {
      "name": scored.plan_name,
      "default": scored.default_plan,
      "sha256": plan_digest(scored.plan),
    },
    "data": data,
    "settings": settings,
  }


def data_record(
  task: str,
  split: str,
  files: dict | None,
  *,
  vocabulary,
  inputs_prefix: str = "",
  fields: list[str] | None = None,
  tfds_data_dir: str = "",
) -> dict:
  """The data an evaluation reads: ``task``'s ``split`` from ``files`` (a file task's
  ``{split: path, glob or list}``; each file is named with the SHA-256 of its contents) or the
  pinned TFDS version, the inputs prefix ("": the task's own), the JSON ``fields`` of a jsonl
  task, and the vocabulary's contents."""
  record = {"task": task, "split": split}
  if task in tasks.TFDS_TASKS:
    record["tfds"] = tasks.TFDS_TASKS[task].tfds_name
    if tfds_data_dir:
      record["tfds_data_dir"] = _absolute(tfds_data_dir)
  if task in tasks.FILE_TASKS and files and split in files:
    paths = sources.resolve_files(split, sources.as_patterns(split, files[split]))
    record["files"] = [{"path": _absolute(p), "sha256": file_digest(p)} for p in paths]
  if fields:
    record["fields"] = list(fields)
  record["inputs_prefix"] = inputs_prefix or None
  record["vocabulary"] = _vocabulary_record(vocabulary)
  return record


def digest(record: dict) -> str:
  """A short digest of ``record`` (key order does not matter)."""
  text = json.dumps(record, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def plan_digest(plan: Plan) -> str:
  return hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]


def file_digest(path) -> str:
  """SHA-256 of a file's bytes (local or gs://), read in 1 MiB pieces."""
  sha = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while piece := f.read(1 << 20):
      sha.update(piece)
  return sha.hexdigest()


def _vocabulary_record(vocabulary) -> dict:
  model = getattr(vocabulary, "sp_model", None)
  contents = model if model is not None else repr(vocabulary).encode()
  return {
    "sha256": hashlib.sha256(contents).hexdigest()[:16],
    "extra_ids": int(vocabulary.extra_ids),
    "size": int(vocabulary.vocab_size),
  }


def _absolute(path) -> str:
  text = os.fspath(path)
  return text if "://" in text else os.path.abspath(text)


# ---- names -------------------------------------------------------------------------------------


def result_stem(record: dict, record_digest: str) -> str:
  """``<split>[_step<N>][_plan-<name>][_draft-<name>-k<K>]_<bank|hf>-<dir>_data-<source>_<digest>``:
  ``<dir>`` is the scored directory's name, ``<source>`` the folder of a file task's first file
  (else the task), ``<digest>`` :func:`digest` of the record (everything else that differs)."""
  bank, data = record["bank"], record["data"]
  split = data["split"]
  stem = split if bank["step"] is None else f"{split}_step{bank['step']}"
  if not record["plan"]["default"]:
    stem += f"_plan-{_label(record['plan']['name'])}"
  draft = record["settings"].get("draft")
  if draft:
    stem += f"_draft-{_label(draft['name'])}-k{draft['tokens']}"
  files = data.get("files")
  source = os.path.basename(os.path.dirname(files[0]["path"])) if files else data["task"]
  bank_dir = os.path.basename(bank["path"].rstrip("/")) or bank["path"]
  return f"{stem}_{bank['kind']}-{_label(bank_dir)}_data-{_label(source)}_{record_digest}"


def _label(name: str) -> str:
  """A plan, directory or folder name as a file-name part: a path gives its stem."""
  if "/" in name or name.endswith(".json"):
    name = epath.Path(name).stem
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:LABEL_CHARS] or "_"


def stored_record(metrics_path) -> dict | None:
  """The evaluation record a metrics file holds; None when it holds none or is not JSON."""
  try:
    stored = json.loads(epath.Path(metrics_path).read_text())
  except (OSError, ValueError):
    return None
  return stored.get("evaluation") if isinstance(stored, dict) else None


def as_stored(record: dict) -> dict:
  """``record`` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(record))
