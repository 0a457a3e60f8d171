# SCFM during pretraining on the testbed: digits_teacher.py, but a quarter of each batch is self windows (fast/slow
# EMA targets) instead of data; 3*64 + 2*16 = 224 sample-passes a step vs 192, so 1030 steps ~ its 1200.
# python train.py config/digits_pretrain_scfm.py   (a plain-FM warm-up, as early EMA targets are meaningless, at the
# same compute, 500 x 192 + 600 x 224 ~ 1200 x 192: add --fm_warmup=500 --max_iters=1100)
out_dir = 'out/digits_pretrain_scfm'
data_dir = 'data/digits'
model = 'digits'
teacher, teacher_ratio = 'none', 0.0
fm_ratio, fm_t = 0.75, 'uniform'  # flow matching on data, the rest self windows: near = fast EMA, far = slow EMA
shift_range = (1.0, 2.0)
ema_slow = 0.995         # as the teacher config: model_ema.safetensors is this EMA
batch_size = 64
max_iters = 1030
lr, lr_schedule = 1e-3, 'cosine'
warmup_iters, min_lr = 50, 1e-4
beta2 = 0.99
ckpt_interval, log_interval = 250, 50
dtype, device = 'float32', 'cpu'  # bf16 matmuls are slow on most CPUs
