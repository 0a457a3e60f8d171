#!/usr/bin/env bash
# Issue 6 on the CPU testbed: EMA strategies, few-shot, progressive distillation, SCFM during pretraining.
# Needs testbed.sh's data and teacher. Every run is an ordinary train.py call; finished runs are skipped.
#   bash ablations.sh [ema|ema_long|fewshot|progressive|pretrain|eval|all]     SEEDS="1337 2" (training seeds) by default
# Two parts can share the 2 cores: OMP_NUM_THREADS=1 bash ablations.sh ema & OMP_NUM_THREADS=1 bash ablations.sh pretrain
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
SEEDS=${SEEDS:-"1337 2"}
TEACHER=out/digits_teacher/model_ema.safetensors
O=out/ablations
what=${1:-all}
mkdir -p $O/fewshot $O/pretrain
# seed 1337 of plain FM and of full-data SCFM are testbed.sh's own runs (same configs, same seed): reuse them
[ -e $O/pretrain/fm_s1337 ] || ln -s ../../digits_teacher $O/pretrain/fm_s1337
[ -e $O/fewshot/full_s1337 ] || ln -s ../../digits_scfm $O/fewshot/full_s1337
train() {  # train OUT_DIR CONFIG ARGS...: skip if OUT_DIR already has its export
  local out=$1; shift
  [ -f "$out/model.safetensors" ] || python train.py "$@" --out_dir="$out"
}
if [[ $what == ema || $what == all ]]; then
  for s in $SEEDS; do  # 300 steps each, the student exported every 25 steps for the curves
    a="config/digits_scfm.py --seed=$s --max_iters=300 --snapshot_interval=25 --ckpt_interval=1000"
    train $O/ema/dual_s$s $a                                                   # fast/slow EMA (the official code)
    train $O/ema/vanilla_s$s $a --near_self=slow --far_teacher=teacher         # one EMA, Eq. 13
    train $O/ema/vanilla-mix_s$s $a --near_self=slow                           # teacher + one EMA, Eq. 21
    train $O/ema/cyc-25_s$s $a --near_self=slow --ema_reset_every=25           # vanilla-mix + cyclic restarts
    train $O/ema/cyc-100_s$s $a --near_self=slow --ema_reset_every=100
  done
fi
if [[ $what == ema_long || $what == all ]]; then  # three of them 3x longer, one seed: does dual overtake later?
  a="config/digits_scfm.py --seed=1337 --max_iters=900 --snapshot_interval=50 --ckpt_interval=1000"
  train $O/ema_long/dual_s1337 $a
  train $O/ema_long/vanilla-mix_s1337 $a --near_self=slow
  train $O/ema_long/cyc-100_s1337 $a --near_self=slow --ema_reset_every=100
fi
if [[ $what == fewshot || $what == all ]]; then
  python data/digits/prepare.py --per_class 1 --out_dir data/digits10
  for s in $SEEDS; do
    train $O/fewshot/full_s$s config/digits_scfm.py --seed=$s
    train $O/fewshot/ten_s$s config/digits_scfm.py --seed=$s --data_dir=data/digits10
  done
fi
if [[ $what == progressive || $what == all ]]; then
  for s in $SEEDS; do
    prev=$TEACHER
    for n in 32 16 8 4; do  # round n: n-step teacher -> n/2-step student
      train $O/progressive/s$s/r$n config/digits_progressive.py --seed=$s --teacher_steps=$n --init_from=$prev
      prev=$O/progressive/s$s/r$n/model.safetensors
    done
  done
fi
if [[ $what == pretrain || $what == all ]]; then
  for s in $SEEDS; do
    train $O/pretrain/fm_s$s config/digits_teacher.py --seed=$s
    train $O/pretrain/scfm_s$s config/digits_pretrain_scfm.py --seed=$s
    train $O/pretrain/scfm-warm_s$s config/digits_pretrain_scfm.py --seed=$s --fm_warmup=500 --max_iters=1100
  done
fi
if [[ $what == eval || $what == all ]]; then
  python ablations.py --root $O --seeds_train "$SEEDS" --out docs/ablations
fi
