# Baseline: progressive distillation (Salimans & Ho 2022) of the testbed teacher with the same loop. One round: every
# sample is a teacher window, so the student's one step regresses onto two Euler sub-steps of the teacher's n-step
# grid (an n/2-step sampler); the next round's frozen teacher is this round's student. ablations.sh runs the rounds:
#   python train.py config/digits_progressive.py --teacher_steps=32 --init_from=<teacher> --out_dir=.../r32
data_dir = 'data/digits'
model = 'digits'
teacher, teacher_ratio = 'copy', 1.0
far_teacher = 'teacher'  # both sub-steps by the (previous round's) teacher
shift_range = (1.0, 1.0)  # the grid the testbed samples on
batch_size = 64
max_iters = 42           # per round; 4 rounds (32 -> 2 steps) = 168 steps, the SCFM run's 170 at the same step cost
lr = 3e-4
beta2 = 0.99
ckpt_interval, log_interval = 1000, 10
dtype, device = 'float32', 'cpu'  # bf16 matmuls are slow on most CPUs
