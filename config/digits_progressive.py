# Baseline: progressive distillation (Salimans & Ho 2022) of the testbed teacher with the same loop. One round: every
# sample is a teacher window, so the student's one step regresses onto two Euler sub-steps of the teacher's n-step
# grid (an n/2-step sampler); the next round's frozen teacher is this round's student. ablations.sh runs the rounds:
#   python train.py config/digits_progressive.py --teacher_steps=32 --init_from=<teacher> --out_dir=.../r32
exec(open('config/digits_scfm.py').read())  # the data, model, optimizer and frozen-copy teacher of the SCFM run
out_dir, init_from = 'out', ''  # train.py's defaults: each round gets its own on the command line
teacher_ratio, far_teacher = 1.0, 'teacher'  # both sub-steps by the (previous round's) teacher
shift_range = (1.0, 1.0)  # the grid the testbed samples on
max_iters = 58           # per round; 5 rounds (32 -> 1 step) = 290 steps, the SCFM run's at the same step cost
ckpt_interval = 1000
