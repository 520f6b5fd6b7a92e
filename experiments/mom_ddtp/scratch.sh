#!/usr/bin/env bash
# Mixture-of-Modules against vanilla GPT-2 on the DDTP-summ descriptions, every row trained FROM
# SCRATCH with configs/mom_gpt2.py:ddtp's data, vocabulary and optimizer (AdamW 1e-3, cosine,
# warm-up 100, the same batches) for STEPS steps, then scored on the whole validation split
# (perplexity). Each workdir's compute.json states the row's parameters, training FLOPs and (MoM)
# capacity drop rate.
#
# Rows (workdir mom_scratch<STEPS>_<row>; ROWS="..." runs a subset):
#   vanilla            GPT-2 of MoM's 6 layers without the routers (5.85M parameters)
#   wider_ffn          param-matched: MoM's parameters, routers included, as wider FFNs
#   extra_layer        param-matched: the routers' parameters as a seventh layer
#   wider_ffn_flops    wider_ffn for the steps that spend MoM's training FLOPs (modjax.methods.mom.baselines)
#   renormalized       MoM, the paper's gate (with K=1 only the balancing loss trains the routers)
#   straight_through   MoM, the paper's forward pass with the gradient of log p (trains the routers)
#   softmax            MoM, Switch's gate
#   authors            MoM with the authors' defaults (anchor layer, H=8; configs/mom_gpt2.py:ddtp_authors),
#                      straight-through gate
#
#   RUNS=/work/runs STEPS=900 bash experiments/mom_ddtp/scratch.sh    # workdirs mom_scratch900_*
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/ddtp-summ}
STEPS=${STEPS:-300}
ROWS=${ROWS:-vanilla wider_ffn extra_layer wider_ffn_flops renormalized straight_through softmax authors}

row() {  # row NAME SIZE STEPS FLAGS...: train, then score the whole validation split
  local name=$1 size=$2 steps=$3
  shift 3
  local workdir="$RUNS/mom_scratch${STEPS}_$name"
  python -m modjax.train --config "configs/mom_gpt2.py:$size,$DATA" --config.workdir="$workdir" \
    --config.train.num_steps="$steps" --config.checkpoint.every_steps=100 "$@"
  python -m modjax.evaluate --config "configs/mom_gpt2.py:$size,$DATA" --config.workdir="$workdir"
}

for name in $ROWS; do
  case $name in
    vanilla | wider_ffn | extra_layer) row "$name" ddtp "$STEPS" --config.mom.baseline="$name" ;;
    wider_ffn_flops)
      flops_steps=$(python -m modjax.methods.mom.baselines --config "configs/mom_gpt2.py:ddtp,$DATA" \
        --config.train.num_steps="$STEPS" --match=wider_ffn)
      row "$name" ddtp "$flops_steps" --config.mom.baseline=wider_ffn ;;
    renormalized | straight_through | softmax) row "$name" ddtp "$STEPS" --config.mom.gate="$name" ;;
    authors) row "$name" ddtp_authors "$STEPS" --config.mom.gate=straight_through ;;
    *) echo "error: unknown row $name in ROWS" >&2; exit 2 ;;
  esac
done
