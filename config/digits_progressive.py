# Issue 6 baseline: progressive distillation (Salimans & Ho 2022) of the testbed teacher with the same loop.
# One round = every sample is a teacher window: the student's one step over two sub-steps of the teacher's n-step
# grid regresses onto the teacher's two Euler sub-steps (near = far = teacher), i.e. an n/2-step sampler. The next
# round starts from this round's student as its frozen teacher, with n halved. ablations.sh runs the rounds:
#   python train.py config/digits_progressive.py --teacher_steps=32 --init_from=<teacher> --out_dir=.../r32
#   python train.py config/digits_progressive.py --teacher_steps=16 --init_from=.../r32/model.safetensors ...
data_dir = 'data/digits'
model = 'digits'
lora_rank = 0
teacher = 'copy'
teacher_ratio = 1.0
far_teacher = 'teacher'  # both sub-steps by the (previous round's) teacher
shift_range = (1.0, 1.0) # the grid the testbed samples on
batch_size = 64
max_iters = 42           # per round; 4 rounds (32 -> 2 steps) = 168 steps, the SCFM run's 170 at the same step cost
lr = 3e-4
beta2 = 0.99
ckpt_interval = 1000
log_interval = 10
dtype = 'float32'
device = 'cpu'
