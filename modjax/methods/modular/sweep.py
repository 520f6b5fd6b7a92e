"""Quality of assembled plans on a validation split, the ``search`` strategy and the sweep.

Quality is teacher-forced cross-entropy per target token (``modjax.train.scoring``; lower is better)
by default, or ROUGE on the first examples of the split (greedy decoding via
``scoring.predict``; ROUGE-Lsum, higher is better). The data come from a run config
(``--config configs/x.py:arg``, as ``modjax.evaluate`` takes it): its task, split
(``data.eval_split``), lengths, ``eval.max_examples``, ``eval.batch_size`` and vocabulary
(``data.vocab_path``, else the bank's ``vocab/spm.model``, else the one of the teacher a module
bank config names in ``modular.teacher``). For a module bank the config it was trained with
(``configs/modular_t5.py:<recipe>,<teacher>``) is the natural choice.

* :func:`search`: score every candidate of ``strategies.search_candidates``, keep the Pareto
  front of quality vs the cost model's estimated cost, time at most ``max_timed`` of it on this
  device, and return the Pareto front of quality vs measured time.
* :func:`sweep`: every rung of the strategies' ladders, timed; those whose measured speed-up
  lies in ``[min_speedup, max_speedup]`` scored; :func:`write_sweep` writes ``sweep.json``,
  ``sweep.md`` and ``pareto.png`` (quality vs measured speed-up).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from modjax.core.plan import Plan
from modjax.core.progress import Progress
from modjax.core.run_config import with_values
from modjax.methods.modular import latency
from modjax.methods.modular import strategies as st
from modjax.store import results
from modjax.train import experiment, scoring

log = logging.getLogger("modjax.assemble")
QUALITY = ("cross_entropy", "rouge")


# ---- quality --------------------------------------------------------------------------------


class Quality:
  """Scores plans of one bank on fixed data, each plan once. :meth:`loss` is lower-is-better
  (cross-entropy, or minus ROUGE-Lsum)."""

  def __init__(self, model, params, data: dict):
    self.model, self.params, self.data = model, params, data
    self.metric = data["metric"]
    self.cache: dict[Plan, dict] = {}

  def score(self, plan: Plan) -> dict:
    if plan not in self.cache:
      d = self.data
      if self.metric == "cross_entropy":
        result = scoring.teacher_forced_metrics(self.model, self.params, plan, d["batches"])
      else:
        texts = scoring.predict(
          self.model,
          self.params,
          plan,
          d["vocabulary"],
          d["examples"],
          batch_size=d["batch_size"],
          inputs_length=d["inputs_length"],
          max_new_tokens=d["max_new_tokens"],
          num_beams=1,
        )
        from modjax.core import metrics  # rouge-score pulls in nltk: only when ROUGE is asked for

        result = metrics.rouge(texts, [ex["targets"] for ex in d["examples"]])
      self.cache[plan] = result
    return self.cache[plan]

  def loss(self, plan: Plan) -> float:
    s = self.score(plan)
    return s["cross_entropy"] if self.metric == "cross_entropy" else -s["rougeLsum"]


def load_quality_data(cfg, bank_dir, model, metric: str = "cross_entropy") -> dict:
  """The validation data ``Quality`` scores on (module docstring); one-line errors for a
  config that cannot give them."""
  from modjax.data import make_eval_examples

  if metric not in QUALITY:
    raise st.AssemblyError(f"--quality {metric!r} is unknown; use one of {QUALITY}")
  if model.kind != "encdec":
    raise st.AssemblyError("assembly scores encoder-decoder (T5) banks; this bank is decoder-only")
  if not cfg.workdir:  # where load_eval_vocabulary looks after the bank (in a copy of cfg)
    cfg = with_values(cfg, {"workdir": os.fspath(bank_dir)})
  vocabulary = experiment.load_eval_vocabulary(cfg, _vocab_dir(cfg, bank_dir))
  if model.config.vocab_size < vocabulary.vocab_size:
    raise experiment.ConfigError(
      f"the vocabulary ({vocabulary.vocab_size} pieces) is larger than the bank's model "
      f"({model.config.vocab_size}); set --config.data.vocab_path to the bank's vocabulary"
    )
  task = experiment.build_task(cfg, vocabulary)
  e, split = cfg.eval, cfg.data.eval_split
  data = {"metric": metric, "split": split, "task": cfg.data.task}
  if metric == "cross_entropy":
    data["batches"] = scoring.make_eval_batches(
      task,
      split,
      feature_lengths=experiment.feature_lengths(cfg, model),
      batch_size=e.batch_size,
      max_examples=e.max_examples or None,
      model_type="encdec",
    )
    count = sum(int(np.any(b["decoder_loss_weights"], axis=1).sum()) for b in data["batches"])
  else:
    data.update(
      examples=make_eval_examples(task, split, e.max_examples or None),
      vocabulary=vocabulary,
      batch_size=e.batch_size,
      inputs_length=cfg.data.inputs_length,
      max_new_tokens=e.max_new_tokens,
    )
    count = len(data["examples"])
  if not count:
    raise experiment.ConfigError(f"split {split!r} of task {cfg.data.task!r} has no examples")
  data["examples_scored"] = count
  return data


def _vocab_dir(cfg, bank_dir) -> epath.Path:
  """The bank's directory, or, when it holds no ``vocab/spm.model``, the teacher's named by a
  module-bank config (``modular.teacher``): a bank trained by ``configs/modular_t5.py`` reads
  the teacher's vocabulary and keeps no copy."""
  root = epath.Path(bank_dir)
  teacher = cfg.modular.teacher if "modular" in cfg else ""
  if not (root / "vocab" / "spm.model").exists() and teacher:
    return epath.Path(teacher)
  return root


def score_all(quality: Quality, plans: Sequence[Plan]) -> list[float]:
  """Losses of ``plans``, with a progress line (N/M, rate, ETA) per plan."""
  out, progress = [], Progress("scored", len(plans), "plans", logger=log, every_secs=0)
  for plan in plans:
    out.append(quality.loss(plan))
    progress.update(note=f"{quality.metric} {abs(out[-1]):.4f}  {plan.describe()}")
  return out


# ---- rows: a plan with its cost, time and quality -------------------------------------------


@dataclasses.dataclass
class Row:
  strategy: str
  candidate: st.Candidate
  teacher: st.Candidate
  timing: latency.Timing
  speedup: float
  quality: dict
  loss: float
  pareto: bool = False
  name: str | None = None

  def to_dict(self) -> dict:
    c = self.candidate
    return {
      "strategy": self.strategy,
      "name": self.name,
      "plan": c.plan.to_dict(),
      "describe": c.plan.describe(),
      "depths": c.depths,
      "params": c.cost.params_total,
      "params_fraction": st.params_fraction(c, self.teacher),
      "estimated_speedup": st.estimated_speedup(c, self.teacher),
      "measured_speedup": self.speedup,
      "seconds": self.timing.seconds,
      "ms_per_token": self.timing.per_token_ms,
      "ms_per_sequence": self.timing.per_sequence_ms,
      "quality": self.quality,
      "pareto": self.pareto,
    }


def _rows(strategy_of, candidates, teacher, timer, quality) -> list[Row]:
  return [
    Row(
      strategy_of(c),
      c,
      teacher,
      timer.measure(c.plan),
      timer.speedup(c.plan),
      quality.score(c.plan),
      quality.loss(c.plan),
    )
    for c in candidates
  ]


def mark_front(rows: Sequence[Row]) -> list[Row]:
  """Flags (and returns, fastest last) the rows on the front of quality vs measured speed-up."""
  front = st.pareto_front(list(rows), lambda r: r.loss, lambda r: -r.speedup)
  for r in rows:
    r.pareto = any(r is f for f in front)
  return sorted(front, key=lambda r: r.speedup)


# ---- search -----------------------------------------------------------------------------------


def search(model, meta, quality: Quality, timer, *, max_candidates=48, max_timed=8) -> list[Row]:
  """The Pareto front of quality vs measured time over the search candidates (module
  docstring), least compressed first."""
  if max_timed < 1:
    raise st.AssemblyError(f"--max-timed must be at least 1 for search, got {max_timed}")
  candidates = st.search_candidates(model, meta, shapes=timer.shapes, max_candidates=max_candidates)
  teacher = candidates[0]
  log.info("search: %d candidate plans; scoring them on %s", len(candidates), quality.metric)
  score_all(quality, [c.plan for c in candidates])
  by_cost = st.pareto_front(
    candidates, lambda c: quality.loss(c.plan), lambda c: st.estimated_cost(c.cost)
  )
  chosen = st.thin(by_cost, max_timed, key=lambda c: st.estimated_cost(c.cost))
  log.info("search: %d on the estimated front, timing %d", len(by_cost), len(chosen))
  latency.time_all(timer, [c.plan for c in chosen], "front plans")
  rows = _rows(lambda c: "search", chosen, teacher, timer, quality)
  return mark_front(rows)


# ---- sweep ------------------------------------------------------------------------------------


def sweep(
  model,
  meta,
  quality: Quality,
  timer,
  *,
  strategies=("speed-first", "size-first"),
  min_speedup=1.1,
  max_speedup=6.0,
  seed=0,
) -> list[Row]:
  """Rows for the teacher and every distinct rung of ``strategies`` whose measured speed-up
  lies in ``[min_speedup, max_speedup]`` (a plan several strategies produce is listed under
  the first)."""
  if not 0 <= min_speedup <= max_speedup:
    raise st.AssemblyError(
      f"--min-speedup {min_speedup:g} / --max-speedup {max_speedup:g}: need 0 <= min <= max"
    )
  owner: dict[Plan, tuple[str, st.Candidate]] = {}
  for name in strategies:
    for c in st.ladder(model, meta, name, shapes=timer.shapes, seed=seed):
      owner.setdefault(c.plan, (name, c))
  teacher_plan = model.identity_plan()
  teacher = owner[teacher_plan][1]
  plans = [p for p in owner if p != teacher_plan]
  log.info("sweep: %d distinct plans from %s", len(plans), ",".join(strategies))
  latency.time_all(timer, plans)
  kept = [p for p in plans if min_speedup <= timer.speedup(p) <= max_speedup]
  log.info(
    "sweep: %d of %d plans measure %g-%gx; scoring them", len(kept), len(plans),
    min_speedup, max_speedup,
  )  # fmt: skip
  score_all(quality, [teacher_plan] + kept)
  candidates = [teacher] + [owner[p][1] for p in kept]

  def strategy_of(c):
    return "teacher" if c.plan == teacher_plan else owner[c.plan][0]

  rows = _rows(strategy_of, candidates, teacher, timer, quality)
  mark_front(rows)
  return sorted(rows, key=lambda r: (r.speedup, r.strategy))


def write_sweep(out, rows: Sequence[Row], info: dict) -> dict:
  """``sweep.json`` (``info`` + rows), ``sweep.md`` and ``pareto.png`` under ``out``."""
  root = epath.Path(out)
  root.mkdir(parents=True, exist_ok=True)
  record = {**info, "plans": [r.to_dict() for r in rows]}
  results.write_text_atomically(root / "sweep.json", json.dumps(record, indent=1))
  results.write_text_atomically(root / "sweep.md", markdown_table(rows, info))
  plot(rows, info, root / "pareto.png")
  log.info("sweep: %d plans -> %s (sweep.json, sweep.md, pareto.png)", len(rows), root)
  return record


def _quality_label(info) -> tuple[str, str]:
  if info["quality"] == "cross_entropy":
    return "cross-entropy", "cross_entropy"
  return "ROUGE-Lsum", "rougeLsum"


def markdown_table(rows: Sequence[Row], info: dict) -> str:
  label, key = _quality_label(info)
  s = info["shapes"]
  lines = [
    f"Bank `{info['bank']}`; {label} on `{info['task']}` split `{info['split']}` "
    f"({info['examples']} examples); greedy decoding of batch {s['batch']}, {s['input_length']} "
    f"input tokens, {s['max_new_tokens']} new tokens on {info['device']}. * = Pareto front.",
    "",
    f"| strategy | plan | enc/dec depth | params | est. speed-up | speed-up | ms/token | {label} |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    d = r.to_dict()
    depth = "/".join(str(d["depths"].get(k, "-")) for k in ("encoder", "decoder"))
    lines.append(
      f"| {d['strategy']}{' *' if r.pareto else ''} | {_plan_cell(d)} | {depth} | "
      f"{d['params_fraction']:.3f} | {d['estimated_speedup']:.2f}x | {d['measured_speedup']:.2f}x"
      f" | {d['ms_per_token']:.3f} | {r.quality[key]:.4f} |"
    )
  return "\n".join(lines) + "\n"


def _plan_cell(d: dict) -> str:
  return (f"`{d['name']}`: " if d["name"] else "") + f"`{d['describe']}`"


def plot(rows: Sequence[Row], info: dict, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  label, key = _quality_label(info)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  markers = {"teacher": "*", "speed-first": "o", "size-first": "s", "random": "^", "search": "D"}
  for strategy in dict.fromkeys(r.strategy for r in rows):
    mine = [r for r in rows if r.strategy == strategy]
    ax.scatter(
      [r.speedup for r in mine],
      [r.quality[key] for r in mine],
      marker=markers.get(strategy, "x"),
      s=90 if strategy == "teacher" else 36,
      label=strategy,
    )
  front = sorted((r for r in rows if r.pareto), key=lambda r: r.speedup)
  ax.plot([r.speedup for r in front], [r.quality[key] for r in front], "k--", lw=1, label="Pareto")
  ax.set_xlabel("measured decoding speed-up vs teacher")
  ax.set_ylabel(f"{label} ({'lower' if key == 'cross_entropy' else 'higher'} is better)")
  ax.set_title(f"Assembled plans on {info['device']}", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
