# Issue 6: as config/digits_pretrain_scfm.py, but the self-distillation slice starts only after 500 steps of plain
# flow matching (scfm.md §5: early EMA targets are meaningless). Equal compute with the 1200-step FM teacher:
# 500 x 192 + 600 x 224 = 1200 x 192 sample-passes (to within 0.1%).
# python train.py config/digits_pretrain_scfm_warm.py
out_dir = 'out/digits_pretrain_scfm_warm'
data_dir = 'data/digits'
model = 'digits'
init_from = ''
lora_rank = 0
teacher = 'none'
fm_ratio = 0.75
fm_warmup = 500          # steps of plain flow matching first
teacher_ratio = 0.0
fm_t = 'uniform'
self_steps = (2, 4, 8, 16)
shift_range = (1.0, 2.0)
ema_fast = 0.99
ema_slow = 0.995
batch_size = 64
max_iters = 1100
lr = 1e-3
lr_schedule = 'cosine'
warmup_iters = 50
min_lr = 1e-4
beta2 = 0.99
ckpt_interval = 250
log_interval = 50
dtype = 'float32'
device = 'cpu'
