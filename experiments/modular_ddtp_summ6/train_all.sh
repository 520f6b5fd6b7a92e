#!/usr/bin/env bash
# Modular Transformers on DDTP-summ: the 6+6-layer teacher, one module bank, and the baselines
# (KD, SFT, pseudo-labelling students at 2x and 3x decoder-side; layer drop needs no training).
# Every run resumes from its checkpoint when rerun. Usage (from the repository root):
#   experiments/modular_ddtp_summ6/train_all.sh [data dir] [runs dir]
set -euo pipefail
DATA=${1:-../shared/data/ddtp-summ}
RUNS=${2:-runs}
TEACHER=$RUNS/ddtp_summ6
# The bank trains 900 steps for every size at once; a KD or pseudo-label student 600 for one
# size, an SFT student 300 (the session's CPU time ran short; see compute.json per run).
declare -A STEPS=([kd]=600 [sft]=300 [pseudo]=600)

# The committed results used the 1,200-step teacher (~0.8 epoch); the converged one is
# experiments/converged_teacher/run.sh.
python -m modjax.train --config "configs/ddtp_summ.py:$DATA,6" --config.workdir="$TEACHER" \
  --config.train.num_steps=1200 --config.train.eval_every=0 --config.train.plateau_window=0 \
  --config.checkpoint.every_steps=200
python -m modjax.train --config "configs/modular_t5.py:ddtp_summ,$TEACHER,$DATA" \
  --config.workdir="$RUNS/summ6_bank" --config.train.num_steps=900 \
  --config.checkpoint.every_steps=150
for kind in kd sft pseudo; do
  for layers in 0,2,4 0,3; do
    name=$(echo "$layers" | tr -cd ',' | wc -c)
    python -m modjax.train --config "configs/baseline_t5.py:$kind,ddtp_summ,$TEACHER,$DATA" \
      --config.baseline.decoder_layers="$layers" --config.train.num_steps="${STEPS[$kind]}" \
      --config.checkpoint.every_steps=100 --config.workdir="$RUNS/summ6_${kind}_dec$((name + 1))"
  done
done
