# CPU testbed, stage 1: a small Flux-architecture teacher trained from scratch on the 8x8 digits by plain flow matching
# python data/digits/prepare.py && python train.py config/digits_teacher.py
out_dir = 'out/digits_teacher'
data_dir = 'data/digits'
model = 'digits'         # pixel space: 1 grey channel x 2x2 patches, 16 image tokens + 12 MiniLM text tokens
teacher, teacher_ratio = 'none', 0.0  # no teacher yet: every sample is flow matching on data
fm_ratio, fm_t = 1.0, 'uniform'
batch_size = 64
max_iters = 2000
lr, lr_schedule = 2e-3, 'cosine'
warmup_iters, min_lr = 50, 1e-4
beta2 = 0.99
ema_slow = 0.995         # model_ema.safetensors (this EMA, ~200-step horizon) is the teacher used next
ckpt_interval, log_interval = 250, 50
dtype, device = 'float32', 'cpu'  # bf16 matmuls are slow on most CPUs
