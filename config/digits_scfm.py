# CPU testbed, stage 2: SCFM-distill the digits teacher into a few-step sampler (all weights trained, a frozen copy
# as the teacher). python train.py config/digits_scfm.py
out_dir = 'out/digits_scfm'
data_dir = 'data/digits'
model = 'digits'
init_from = 'out/digits_teacher/model_ema.safetensors'
teacher = 'copy'         # frozen copy of the initial (teacher) weights
shift_range = (1.0, 2.0)  # the testbed samples with shift 1 (8x8 pixels need no high-noise emphasis)
batch_size = 64
max_iters = 290          # x 1.7 teacher-step cost = 25% of the teacher's 2000 steps
lr = 3e-4
beta2 = 0.99
ckpt_interval, log_interval = 50, 10
dtype, device = 'float32', 'cpu'  # bf16 matmuls are slow on most CPUs
