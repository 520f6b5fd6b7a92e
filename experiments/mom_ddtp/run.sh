#!/usr/bin/env bash
# Mixture-of-Modules against vanilla GPT-2 on the DDTP-summ descriptions, phase two (the paper's
# recipe): every row continues from the vanilla original ORIG (configs/ddtp_lm.py's run) for STEPS
# steps on the same batches, with configs/mom_gpt2.py:ddtp's data, vocabulary and optimizer, then
# is scored on the whole validation split (perplexity). Each workdir's compute.json states the
# row's parameters, training FLOPs and (MoM) capacity drop rate.
#
# Rows (workdir mom_cmp<STEPS>_<row>; ROWS="..." runs a subset):
#   vanilla            the original continued: its 6 layers, ON ITS OWN SCHEDULE (no new warm-up)
#   wider_ffn          param-matched control: the original grown to MoM's parameters, routers
#                      included (wider FFNs, new units silent at the start), same schedule
#   wider_ffn_flops    the same, for the steps that spend MoM's training FLOPs (modjax.methods.mom.baselines)
#   renormalized       MoM, the paper's gate (with K=1 only the balancing loss trains the routers)
#   straight_through   MoM, the paper's forward pass with the gradient of log p (trains the routers)
#   softmax            MoM, Switch's gate
#   authors            MoM with the authors' defaults (anchor layer, H=8; configs/mom_gpt2.py:ddtp_authors),
#                      straight-through gate
# MoM rows start a fresh schedule (AdamW 1e-3, cosine, warm-up 15): their routers are new.
#
# The controls continue ORIG's schedule from its step; an original whose cosine has ended (e.g. the
# 900-step configs/ddtp_lm.py run, lr 0 at its end) is an error unless CONTROL_HORIZON gives the
# schedule a longer length (its rate then resumes at that schedule's value at ORIG's step). Train
# the original to a validation plateau first (experiments/converged_teacher's recipe).
#
#   RUNS=/work/runs STEPS=450 ORIG=/work/runs/ddtp_lm_converged bash experiments/mom_ddtp/run.sh
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/ddtp-summ}
STEPS=${STEPS:-150}
ORIG=${ORIG:-$RUNS/ddtp_lm}
ROWS=${ROWS:-vanilla wider_ffn wider_ffn_flops renormalized straight_through softmax authors}
FRESH=(--config.optimizer.warmup_steps=15)
CONTINUED=(--config.mom.continue_schedule=True)
if [ -n "${CONTROL_HORIZON:-}" ]; then
  CONTINUED+=(--config.optimizer.schedule_steps="$CONTROL_HORIZON")
fi

row() {  # row NAME SIZE STEPS FLAGS...: train, then score the whole validation split
  local name=$1 size=$2 steps=$3
  shift 3
  local workdir="$RUNS/mom_cmp${STEPS}_$name"
  python -m modjax.train --config "configs/mom_gpt2.py:$size,$DATA" --config.workdir="$workdir" \
    --config.mom.init_from="$ORIG" --config.train.num_steps="$steps" \
    --config.checkpoint.every_steps=50 "$@"
  python -m modjax.evaluate --config "configs/mom_gpt2.py:$size,$DATA" --config.workdir="$workdir" \
    --config.data.vocab_path="$ORIG/vocab/spm.model" --config.data.extra_ids=0
}

for name in $ROWS; do
  case $name in
    vanilla | wider_ffn) row "$name" ddtp "$STEPS" --config.mom.baseline="$name" "${CONTINUED[@]}" ;;
    wider_ffn_flops)
      flops_steps=$(python -m modjax.methods.mom.baselines --config "configs/mom_gpt2.py:ddtp,$DATA" \
        --config.mom.init_from="$ORIG" --config.train.num_steps="$STEPS" --match=wider_ffn)
      row "$name" ddtp "$flops_steps" --config.mom.baseline=wider_ffn "${CONTINUED[@]}" ;;
    renormalized | straight_through | softmax)
      row "$name" ddtp "$STEPS" --config.mom.gate="$name" "${FRESH[@]}" ;;
    authors) row "$name" ddtp_authors "$STEPS" --config.mom.gate=straight_through "${FRESH[@]}" ;;
    *) echo "error: unknown row $name in ROWS" >&2; exit 2 ;;
  esac
done
