#!/usr/bin/env bash
# Mixture-of-Modules against vanilla GPT-2 at equal parameters on the DDTP-summ descriptions,
# phase two (the paper's recipe): both continue from configs/ddtp_lm.py's 900-step vanilla run
# for STEPS more steps, on the same batches, with the same optimizer (AdamW 1e-3, cosine, warm-up
# 15). The vanilla control continues the same model (exported to HF, model.init_from); the MoM
# runs map its layers into the pools (mom.init_from) with the paper's renormalised gate and with
# the softmax gate. Each run is then scored on the whole validation split (perplexity).
#
#   RUNS=/work/runs STEPS=450 bash experiments/mom_ddtp/run.sh     # mom_cmp450_*; after experiments/ffn_merge_ddtp/train_originals.sh
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/ddtp-summ}
STEPS=${STEPS:-150}
VOCAB=(--config.data.vocab_path="$RUNS/ddtp_lm/vocab/spm.model" --config.data.extra_ids=0)
COMMON=(--config.train.num_steps="$STEPS" --config.optimizer.warmup_steps=15
  --config.checkpoint.every_steps=50)

if [ ! -d "$RUNS/ddtp_lm_hf/hf" ]; then
  python -m modjax.export --bank "$RUNS/ddtp_lm" --plan default --out "$RUNS/ddtp_lm_hf" --formats hf
fi
python -m modjax.train --config "configs/ddtp_lm.py:$DATA" --config.workdir="$RUNS/mom_cmp${STEPS}_vanilla" \
  --config.model.init_from="$RUNS/ddtp_lm_hf/hf" "${VOCAB[@]}" "${COMMON[@]}"
python -m modjax.evaluate --config "configs/ddtp_lm.py:$DATA" \
  --config.workdir="$RUNS/mom_cmp${STEPS}_vanilla" "${VOCAB[@]}"
for gate in renormalized softmax; do
  python -m modjax.train --config "configs/mom_gpt2.py:ddtp,$DATA" \
    --config.workdir="$RUNS/mom_cmp${STEPS}_$gate" --config.mom.init_from="$RUNS/ddtp_lm" \
    --config.mom.gate="$gate" "${COMMON[@]}"
  python -m modjax.evaluate --config "configs/mom_gpt2.py:ddtp,$DATA" \
    --config.workdir="$RUNS/mom_cmp${STEPS}_$gate" "${VOCAB[@]}"
done
