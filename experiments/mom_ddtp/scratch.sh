#!/usr/bin/env bash
# Mixture-of-Modules against vanilla GPT-2 at equal parameters on the DDTP-summ descriptions, both
# trained FROM SCRATCH for STEPS steps on the same batches with the same optimizer (configs/ddtp_lm.py's
# AdamW 1e-3, cosine, warm-up 100), then scored on the whole validation split (perplexity).
#
#   RUNS=/work/runs STEPS=900 bash experiments/mom_ddtp/scratch.sh    # workdirs mom_scratch900_*
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/ddtp-summ}
STEPS=${STEPS:-300}
COMMON=(--config.train.num_steps="$STEPS" --config.checkpoint.every_steps=100)

python -m modjax.train --config "configs/ddtp_lm.py:$DATA" \
  --config.workdir="$RUNS/mom_scratch${STEPS}_vanilla" "${COMMON[@]}"
python -m modjax.evaluate --config "configs/ddtp_lm.py:$DATA" --config.workdir="$RUNS/mom_scratch${STEPS}_vanilla"
for gate in softmax renormalized; do
  python -m modjax.train --config "configs/mom_gpt2.py:ddtp,$DATA" \
    --config.workdir="$RUNS/mom_scratch${STEPS}_$gate" --config.mom.gate="$gate" "${COMMON[@]}"
  python -m modjax.evaluate --config "configs/mom_gpt2.py:ddtp,$DATA" \
    --config.workdir="$RUNS/mom_scratch${STEPS}_$gate"
done
