#!/usr/bin/env bash
# The Modular Transformers recipe, one factor at a time (issue: "the recipe ablated"): a
# decoder-only bank (granularities decoder:2,3,6; every plan runs the teacher's frozen encoder)
# per factor, each changed from the default recipe alone, trained STEPS steps on the teacher's
# data, then its 2x and 3x decoder rungs (the bank's all-g2 and all-g3 plans: 3 and 2 decoder
# slots) scored by ROUGE on EXAMPLES validation examples; report.py writes the table.
# Every bank resumes from its checkpoint when rerun, a finished one trains no further, and a rung
# already scored at the bank's last step on this many examples is not scored again. A factor's
# flags come last, so they may change the steps too.
# Usage (from the repository root), e.g. in the background:
#   nohup experiments/modular_ablation/run.sh [teacher] [data] [runs] [steps] > ablation.log 2>&1 &
# ONLY="default kd-off" runs a subset; SEED=1 a second seed (runs/<factor>-s1).
set -euo pipefail
TEACHER=${1:-runs/ddtp_summ6_converged}
DATA=${2:-../shared/data/ddtp-summ}
RUNS=${3:-runs/ablation}
STEPS=${4:-300}
EXAMPLES=${EXAMPLES:-500}
SEED=${SEED:-0}
declare -A FACTORS=(
  [default]=""
  [hidden-0.1]="--config.modular.hidden=0.1"
  [hidden-0]="--config.modular.hidden=0"
  [attn-0.1]="--config.modular.attn=0.1"
  [attn-0]="--config.modular.attn=0"
  [hidden-normalized]="--config.modular.hidden_form=normalized"
  [hidden-cosine]="--config.modular.hidden_form=cosine"
  [kd-off]="--config.modular.kd=0"
  [granularities-2-3]="--config.modular.granularities=decoder:2,3"
  # {2,3} at the default's module updates (~79 / 75 for g2 / g3): 200 steps instead of 300
  [granularities-2-3-updates]="--config.modular.granularities=decoder:2,3 --config.train.num_steps=200"
  [p1-second-half]="--config.modular.ramp_fraction=0.5"
  [fine-to-coarse]="--config.modular.order=fine_to_coarse"
  [uniform-order]="--config.modular.order=uniform"
  [adafactor-update-clip]="--config.optimizer.adafactor_clipping=1.0"
  [adamw]="--config.optimizer.name=adamw --config.optimizer.learning_rate=0.001 --config.optimizer.schedule=cosine"
)
scored() {  # scored <run> <plan>: a record of this plan at the bank's last step and EXAMPLES exists
  python - "$1" "$2" "$EXAMPLES" <<'PY'
import glob, json, sys
run, plan, examples = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = json.load(open(f"{run}/compute.json"))["steps"]
records = [json.load(open(p)) for p in glob.glob(f"{run}/eval/*.metrics.json")]
want = {"plan_name": plan, "step": steps, "examples": examples}
sys.exit(0 if any(all(r.get(k) == v for k, v in want.items()) for r in records) else 1)
PY
}
CONFIG="configs/modular_t5.py:ddtp_summ,$TEACHER,$DATA"
VOCAB="--config.data.vocab_path=$TEACHER/vocab/spm.model --config.data.extra_ids=0"
for name in ${ONLY:-$(printf '%s\n' "${!FACTORS[@]}" | sort)}; do
  if [[ -z ${FACTORS[$name]+set} ]]; then
    echo "error: unknown factor '$name'; choose from: $(printf '%s ' "${!FACTORS[@]}")" >&2
    exit 2
  fi
  run="$RUNS/$name$([[ $SEED == 0 ]] || echo "-s$SEED")"
  echo "== $name ($run): ${FACTORS[$name]:-the default recipe}"
  # shellcheck disable=SC2086  # the factor's flags are words
  python -m modjax.train --config "$CONFIG" --config.workdir="$run" --config.train.seed="$SEED" \
    --config.modular.granularities=decoder:2,3,6 --config.train.num_steps="$STEPS" \
    --config.checkpoint.every_steps=100 $VOCAB ${FACTORS[$name]}
  for plan in all-g2 all-g3; do
    if scored "$run" "$plan"; then
      echo "$run: $plan already scored at step $STEPS on $EXAMPLES examples"
      continue
    fi
    # shellcheck disable=SC2086
    python -m modjax.evaluate --config "$CONFIG" --config.workdir="$run" --plan "$plan" $VOCAB \
      --config.eval.metrics=rouge --config.eval.max_examples="$EXAMPLES"
  done
done
python experiments/modular_ablation/report.py "$RUNS"
