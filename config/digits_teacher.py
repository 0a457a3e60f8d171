# CPU testbed, stage 1: pretrain a small Flux-architecture teacher on the 8x8 digits by plain flow matching
# python data/digits/prepare.py && python train.py config/digits_teacher.py
out_dir = 'out/digits_teacher'
data_dir = 'data/digits'
model = 'digits'         # pixel space: 1 grey channel x 2x2 patch, 16 image tokens + 16 MiniLM text tokens
init_from = ''           # from scratch
lora_rank = 0
teacher = 'none'         # no teacher yet: every sample is flow matching on data
teacher_ratio = 0.0
fm_ratio = 1.0
fm_t = 'uniform'
batch_size = 64
max_iters = 1200
lr = 1e-3
lr_schedule = 'cosine'
warmup_iters = 50
min_lr = 1e-4
beta2 = 0.99
ema_slow = 0.995         # model_ema.safetensors (this EMA, ~200-step horizon) is the teacher used next
ckpt_interval = 250
log_interval = 50
dtype = 'float32'        # bf16 matmuls are slow on most CPUs
device = 'cpu'
