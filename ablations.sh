#!/usr/bin/env bash
# The CPU testbed as a lab: five few-step methods at equal distillation compute (teacher, SCFM, progressive distillation,
# shortcut models distilled and from scratch), EMA strategies, few-shot distillation, SCFM during pretraining and the
# official FLUX run's choices, then their tables and figures (python ablations.py -> docs/ablations/, docs/*.png).
# Needs testbed.sh's data and teacher. Every run is an ordinary train.py call; finished runs are skipped.
#   bash ablations.sh [lab|ema|ema_long|fewshot|pretrain|official|eval|all]   SEEDS="1337 2" (training seeds) by default
# lab and eval write the tables and figures of the runs found. Two parts can share the 2 cores:
#   OMP_NUM_THREADS=1 bash ablations.sh ema & OMP_NUM_THREADS=1 bash ablations.sh pretrain
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
SEEDS=${SEEDS:-"1337 2"}
TEACHER=out/digits_teacher/model_ema.safetensors
RUNS=out/ablations
what=${1:-all}
part() { [[ $what == all || " $* " == *" $what "* ]]; }  # part NAME...: was one of these asked for?
mkdir -p $RUNS/fewshot $RUNS/pretrain $RUNS/official
# seed 1337 of plain FM and of full-data SCFM are testbed.sh's own runs (same configs, same seed): reuse them
[ -e $RUNS/pretrain/fm_s1337 ] || ln -s ../../digits_teacher $RUNS/pretrain/fm_s1337
[ -e $RUNS/fewshot/full_s1337 ] || ln -s ../../digits_scfm $RUNS/fewshot/full_s1337
[ -e $RUNS/official/full_s1337 ] || ln -s ../../digits_scfm $RUNS/official/full_s1337
train() {  # train OUT_DIR CONFIG ARGS...: skip if OUT_DIR has its export, resume an interrupted run, else start afresh
  local out=$1; shift
  [ -f "$out/model.safetensors" ] || [ -f "$out/lora.safetensors" ] || python train.py "$@" --out_dir="$out" \
      $([ -f "$out/latest" ] && echo --resume=True || echo --overwrite=True)
}
if part ema; then
  for s in $SEEDS; do  # 300 steps each, the student exported every 25 steps for the curves
    common="config/digits_scfm.py --seed=$s --max_iters=300 --snapshot_interval=25 --ckpt_interval=1000"
    train $RUNS/ema/dual_s$s $common                                            # fast/slow EMA (the official code)
    train $RUNS/ema/vanilla_s$s $common --near_self=slow --far_teacher=teacher  # one EMA, Eq. 13
    train $RUNS/ema/vanilla-mix_s$s $common --near_self=slow                    # teacher + one EMA, Eq. 21
    train $RUNS/ema/cyc-25_s$s $common --near_self=slow --ema_reset_every=25    # vanilla-mix + cyclic restarts
    train $RUNS/ema/cyc-100_s$s $common --near_self=slow --ema_reset_every=100
  done
fi
if part ema_long; then  # three of them 3x longer, one seed: does dual overtake later?
  common="config/digits_scfm.py --seed=1337 --max_iters=900 --snapshot_interval=50 --ckpt_interval=1000"
  train $RUNS/ema_long/dual_s1337 $common
  train $RUNS/ema_long/vanilla-mix_s1337 $common --near_self=slow
  train $RUNS/ema_long/cyc-100_s1337 $common --near_self=slow --ema_reset_every=100
fi
part fewshot && python data/digits/prepare.py --per_class 1 --out_dir data/digits10
for s in $SEEDS; do
  part lab pretrain && train $RUNS/pretrain/fm_s$s config/digits_teacher.py --seed=$s  # the teacher, another seed
  part lab fewshot && train $RUNS/fewshot/full_s$s config/digits_scfm.py --seed=$s
  if part lab; then
    prev=$TEACHER
    for n in 32 16 8 4 2; do  # progressive distillation, round n: n-step teacher -> n/2-step student
      train $RUNS/progressive/s$s/r$n config/digits_progressive.py --seed=$s --teacher_steps=$n --init_from=$prev
      prev=$RUNS/progressive/s$s/r$n/model.safetensors
    done
    train $RUNS/lab/scfm-step_s$s config/digits_scfm.py --seed=$s --step_embed=True  # SCFM with a step-size input
    train $RUNS/lab/shortcut-distill_s$s config/digits_shortcut_distill.py --seed=$s
    train $RUNS/lab/shortcut_s$s config/digits_shortcut.py --seed=$s
  fi
  part fewshot && train $RUNS/fewshot/ten_s$s config/digits_scfm.py --seed=$s --data_dir=data/digits10
  if part pretrain; then
    train $RUNS/pretrain/scfm_s$s config/digits_pretrain_scfm.py --seed=$s
    train $RUNS/pretrain/scfm-warm_s$s config/digits_pretrain_scfm.py --seed=$s --fm_warmup=800 --max_iters=1829
  fi
done
if part official; then  # the official FLUX run's choices, one at a time (README)
  for s in $SEEDS; do
    lora="config/digits_scfm.py --seed=$s --lora_rank=16 --teacher=lora_off --lr=1e-3"
    train $RUNS/official/lora_s$s $lora                        # ours: fused, kaiming, EMAs = student, fp32, clip 1
    train $RUNS/official/lora-ema-zero_s$s $lora --ema_init=zero
    train $RUNS/official/lora-bf16_s$s $lora --dtype=bfloat16 --master_dtype=bfloat16
    train $RUNS/official/lora-gaussian_s$s $lora --lora_init=gaussian
    train $RUNS/official/lora-split_s$s $lora --lora_layout=split
    train $RUNS/official/lora-clip10_s$s $lora --grad_clip=10.0
    train $RUNS/official/lora-official_s$s $lora --ema_init=zero --dtype=bfloat16 --master_dtype=bfloat16 \
        --lora_init=gaussian --lora_layout=split --grad_clip=10.0 --weight_decay=1e-4
    full="config/digits_scfm.py --seed=$s"  # all weights: the choices that apply (zero EMAs are for LoRA deltas)
    train $RUNS/official/full_s$s $full
    train $RUNS/official/full-bf16_s$s $full --dtype=bfloat16 --master_dtype=bfloat16
    train $RUNS/official/full-clip10_s$s $full --grad_clip=10.0
  done
fi
if part lab eval; then
  python ablations.py --root $RUNS --seeds_train "$SEEDS" --out docs/ablations
fi
