#!/usr/bin/env bash
# The CPU testbed, end to end: digits -> teacher (flow matching) -> SCFM student -> quality table + image grid.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle OpenMP threads must not spin
t0=$SECONDS
python data/digits/prepare.py
python train.py config/digits_teacher.py --overwrite=True "$@"  # a rerun trains afresh
t1=$SECONDS
python train.py config/digits_scfm.py --overwrite=True
t2=$SECONDS
python eval_digits.py --teacher out/digits_teacher/model_ema.safetensors --student out/digits_scfm/model.safetensors \
    --out out/digits_eval
echo "testbed: prepare+teacher $((t1 - t0)) s, SCFM $((t2 - t1)) s, eval $((SECONDS - t2)) s, total $((SECONDS - t0)) s"
