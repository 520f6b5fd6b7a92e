#!/usr/bin/env bash
# Modular Transformers against a student per size, on the converged DDTP-summ teacher, with the
# same trainable scope on every row (issue: "measured as the paper means it"):
#   bank       one decoder-only bank (GRANULARITIES; every plan runs the teacher's frozen encoder)
#   <kind>_dec<n>            KD / SFT / pseudo-label students keeping n decoder layers, the
#                            teacher's encoder frozen (the headline column)
#   <kind>_dec<n>_trainenc   the same students training their encoder too (second column)
#   kd_dec<n>_updates        a KD student given only the bank's expected updates of the module
#                            granularity its rung uses (steps = compute.json's module_updates)
#   bank_kdflops             a bank given the KD students' combined training FLOPs
# Every run writes compute.json (steps, examples seen, module updates, training FLOPs) and
# resumes from its checkpoint when rerun; a finished run trains no further. Layer drop needs no
# training (compare.py scores it). Usage (from the repository root):
#   experiments/modular_converged/train.sh [teacher] [data] [runs]
# SEED=1 trains the second seed of every run (names suffixed -s1); BANK_STEPS and
# STUDENT_STEPS set the budgets (900 and 600), GRANULARITIES the banks' (decoder:2,3,6).
set -euo pipefail
TEACHER=${1:-runs/ddtp_summ6_converged}
DATA=${2:-../shared/data/ddtp-summ}
RUNS=${3:-runs/modular_converged}
SEED=${SEED:-0}
BANK_STEPS=${BANK_STEPS:-900}
STUDENT_STEPS=${STUDENT_STEPS:-600}
GRANULARITIES=${GRANULARITIES:-decoder:2,3,6}
suffix=$([[ $SEED == 0 ]] || echo "-s$SEED")
common=(--config.train.seed="$SEED" --config.checkpoint.every_steps=100
  --config.data.vocab_path="$TEACHER/vocab/spm.model" --config.data.extra_ids=0)
bank() {  # bank <name> <steps>
  python -m modjax.train --config "configs/modular_t5.py:ddtp_summ,$TEACHER,$DATA" \
    --config.workdir="$RUNS/$1$suffix" --config.train.num_steps="$2" \
    --config.modular.granularities="$GRANULARITIES" "${common[@]}"
}
student() {  # student <kind> <decoder layers> <name> <steps> [frozen stacks]
  python -m modjax.train --config "configs/baseline_t5.py:$1,ddtp_summ,$TEACHER,$DATA" \
    --config.workdir="$RUNS/$3$suffix" --config.train.num_steps="$4" \
    --config.baseline.decoder_layers="$2" --config.baseline.frozen_stacks="${5:-}" "${common[@]}"
}
updates() {  # the bank's expected updates of one granularity's modules (rounded)
  python -c "import json,sys; u=json.load(open(sys.argv[1]))['module_updates']['decoder']; \
print(max(1, round(u['g' + sys.argv[2]])))" "$RUNS/bank$suffix/compute.json" "$1"
}
flops() {  # training FLOPs of a run
  python -c "import json,sys; print(json.load(open(sys.argv[1]))['training_flops'])" "$1/compute.json"
}

declare -A LAYERS=([dec4]="0,2,4,5" [dec3]="0,2,4" [dec2]="0,3")  # ~1.5x, 2x, 3x decoder-side
declare -A GRANULARITY=([dec3]=2 [dec2]=3)  # the bank rung of the same depth: all-g2, all-g3
# The students first: they do not depend on the bank's recipe, which the ablation may still change.
for kind in kd sft pseudo; do
  for point in dec3 dec2 dec4; do
    student "$kind" "${LAYERS[$point]}" "${kind}_$point" "$STUDENT_STEPS" encoder
    student "$kind" "${LAYERS[$point]}" "${kind}_${point}_trainenc" "$STUDENT_STEPS"
  done
done
bank bank "$BANK_STEPS"
for point in dec3 dec2; do
  student kd "${LAYERS[$point]}" "kd_${point}_updates" "$(updates "${GRANULARITY[$point]}")" encoder
done
total=0
for point in dec4 dec3 dec2; do
  total=$(python -c "print($total + $(flops "$RUNS/kd_$point$suffix"))")
done
per_step=$(python -c "print($(flops "$RUNS/bank$suffix") / $BANK_STEPS)")
bank bank_kdflops "$(python -c "print(max(1, round($total / $per_step)))")"
