#!/usr/bin/env bash
# The two originals FFN merging compresses: a GPT-2-shaped LM on DDTP-summ descriptions and a
# 6+6-layer T5 on DDTP en->de. Sequential (each uses every core). Resumes from checkpoints.
#   bash experiments/ffn_merge_ddtp/train_originals.sh [runs dir] [data dir]
set -euo pipefail
RUNS=${1:-runs}
DATA=${2:-../shared/data}
python -m modjax.train --config "configs/ddtp_lm.py:$DATA/ddtp-summ" --config.workdir="$RUNS/ddtp_lm"
python -m modjax.train --config "configs/ddtp_ende.py:$DATA/ddtp-ende" --config.workdir="$RUNS/ddtp_ende"
