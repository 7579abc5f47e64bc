#!/usr/bin/env bash
# The runs of docs/QUANTIZATION.md, "Does re-tuning the morphology cost the low-bit runs?", "Does a floor of 3 bits
# bring the learned 4 / 4 run within 0.02 of float?" and "Does a ReLU backbone hold low-bit activations?", per fold:
# the `small` fold model of usgra-seg (2 threads), then the QAT runs RUNS names (default: W4A4 with both allocations
# and learned 4 / 4 bits from the allocation) side by side, one thread each. Resumable: run it again with the same
# arguments and every finished step is skipped, an interrupted QAT run continues from its last checkpoint.
#
#   scripts/lowbit_folds.sh CV PHANTOM_DIR FOLD...     e.g. scripts/lowbit_folds.sh /work/runs/CV "" 3 5 1 4 2
#   RUNS="learned-44-b3-from-alloc-x86" scripts/lowbit_folds.sh CV PHANTOM_DIR 1 4 2
#   CV_FLAGS="--relu-backbone" RUNS="w4a4-low-walloc-x86 w2a2-low-walloc-x86" scripts/lowbit_folds.sh CV-relu "" 3
#
# PHANTOM_DIR: a finished phantom stage to reuse (a pipeline run's RUN/phantom), or "" for the fold run's own (one
# for all folds of CV). CV_FLAGS: more flags of the fold models' `nerveseg cv` (the same on every call for one CV).
set -euo pipefail

cv=$1 phantom=$2
shift 2
data=${DATA:-../shared/data/usgra-seg}
low_bit="--epochs 12 --grid x86 --activation-range tight --activation-init mse --bias-correction
         --activation-allocation sensitivity --weight-allocation sensitivity"
learned_44="--bit-epochs 4 --bits learned --target-bits 4 --target-activation-bits 4"
declare -A runs=(
  [w4a4-low-walloc-x86]="--bits 4"
  [learned-44-from-alloc-x86]="$learned_44"
  [learned-44-b3-from-alloc-x86]="$learned_44 --b-min 3"  # the same run, its learned bits floored at 3
  [w2a2-low-walloc-x86]="--bits 2"  # one-bit grids among the allocation's choices at this budget
)
chosen=${RUNS:-w4a4-low-walloc-x86 learned-44-from-alloc-x86}
for name in $chosen; do
  [[ -v "runs[$name]" ]] || { echo "lowbit_folds.sh: RUNS: unknown run $name (known: ${!runs[*]})" >&2; exit 2; }
done

qat_run() {  # FOLD NAME: train (or continue, or skip) one QAT run on one thread
  local fold_dir=$1 name=$2 resume=""
  [[ -f $fold_dir/qat/$name/test_metrics.json ]] && { echo "$fold_dir/qat/$name: finished"; return; }
  [[ -d $fold_dir/qat/$name/checkpoints ]] && resume="--resume"
  # shellcheck disable=SC2086  # the option strings split into words on purpose
  if OMP_NUM_THREADS=1 nerveseg qat --run-dir "$fold_dir" $low_bit ${runs[$name]} --name "$name" $resume \
      > "$fold_dir/qat-$name.log" 2>&1; then
    echo "$fold_dir/qat/$name: finished"
  else
    echo "$fold_dir/qat/$name: stopped with exit $? (its log: $fold_dir/qat-$name.log; run again to resume)"
  fi
}

for fold in "$@"; do
  # shellcheck disable=SC2086  # CV_FLAGS splits into flags on purpose
  OMP_NUM_THREADS=2 nerveseg cv --data "$data" --mask-label 1 --folds 5 --recipe small --run-dir "$cv" \
    --only-folds "$fold" ${phantom:+--phantom-dir "$phantom"} ${CV_FLAGS:-}
  for name in $chosen; do
    qat_run "$cv/fold-$fold" "$name" &
  done
  wait
done
