#!/usr/bin/env bash
# The converged DDTP-summ teacher (6+6 layers, d_model 256): trained until its validation loss
# improves by less than 1% over an epoch (configs/ddtp_summ.py:<data>,6), then its curve written
# to results/. Resumes from the run's latest checkpoint when rerun; a converged run trains no
# further. Usage (from the repository root), e.g. in the background:
#   nohup experiments/converged_teacher/run.sh [data dir] [run dir] > teacher.log 2>&1 &
set -euo pipefail
DATA=${1:-../shared/data/ddtp-summ}
RUN=${2:-runs/ddtp_summ6_converged}
python -m modjax.train --config "configs/ddtp_summ.py:$DATA,6" --config.workdir="$RUN"
python experiments/converged_teacher/report.py "$RUN"
