# Baseline: a shortcut model (Frans et al. 2025) from scratch at the teacher's compute. Flow matching on data at the
# smallest step d = 1/128 on 3/4 of each batch; on the rest the bootstrap target s(x_t, t, 2d) = 1/2 s(x_t, t, d) +
# 1/2 s(x_t - d s, t - d, d) by the EMA, d = 1/n (n = 2..128). python train.py config/digits_shortcut.py
exec(open('config/digits_teacher.py').read())  # the teacher's data, model, optimizer, EMA
out_dir = 'out/digits_shortcut'
step_embed = True
fm_ratio, self_steps, shift_range = 0.75, (2, 4, 8, 16, 32, 64, 128), (1.0, 1.0)
near_self = 'slow'       # both bootstrap passes by the one EMA (model_ema.safetensors), as the reference code
max_iters = round(max_iters * 6 / 7)  # a bootstrap sample costs 2 more forwards: 3 + 2/4 passes a sample, not 3
