# Baseline: the testbed teacher distilled into a shortcut model at SCFM's compute (every sample a window). Teacher
# windows of two 1/256 sub-steps train the smallest step d = 1/128 in place of flow matching on data; a quarter of
# each batch is the bootstrap target from the EMA on the 2..128-step grids. The new step-size input starts at zero, so
# the student starts as the teacher. python train.py config/digits_shortcut_distill.py
exec(open('config/digits_scfm.py').read())  # the teacher, data, model and optimizer
out_dir = 'out/digits_shortcut_distill'
step_embed = True
teacher_ratio, teacher_steps, far_teacher = 0.75, 256, 'teacher'  # both sub-steps by the teacher
self_steps, shift_range = (2, 4, 8, 16, 32, 64, 128), (1.0, 1.0)
near_self, ema_slow = 'slow', 0.99  # one EMA for both bootstrap passes, its horizon fit for a short run
