# Issue 6: SCFM *during pretraining* on the testbed. The teacher config (plain flow matching from scratch), but a
# quarter of each batch is the self-distillation slice (fast/slow EMA targets on coarse windows) instead of data.
# No teacher exists yet, so there is no teacher slice. Compare with config/digits_teacher.py at equal compute:
# a step here costs 3*64 + 2*16 = 224 sample-passes vs 192 for plain FM, so 1030 steps here ~ 1200 steps there.
# python train.py config/digits_pretrain_scfm.py
# With a plain-FM warm-up (early EMA targets are meaningless, scfm.md §5), the same compute:
# python train.py config/digits_pretrain_scfm.py --fm_warmup=500 --max_iters=1100   (500 x 192 + 600 x 224 ~ 1200 x 192)
out_dir = 'out/digits_pretrain_scfm'
data_dir = 'data/digits'
model = 'digits'
init_from = ''
lora_rank = 0
teacher = 'none'
fm_ratio = 0.75          # flow matching on data (the shortcut-models share, scfm.md §5) ...
teacher_ratio = 0.0      # ... and the rest self windows: near = fast EMA, far = slow EMA
fm_t = 'uniform'
self_steps = (2, 4, 8, 16)
shift_range = (1.0, 2.0)
ema_fast = 0.99
ema_slow = 0.995         # as the teacher config: model_ema.safetensors is this EMA
batch_size = 64
max_iters = 1030
lr = 1e-3
lr_schedule = 'cosine'
warmup_iters = 50
min_lr = 1e-4
beta2 = 0.99
ckpt_interval = 250
log_interval = 50
dtype = 'float32'
device = 'cpu'
