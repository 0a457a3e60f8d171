# SCFM during pretraining on the testbed: digits_teacher.py, but a quarter of each batch is self windows (fast/slow
# EMA targets) instead of data; 3*64 + 2*16 = 224 sample-passes a step vs 192, so 1714 steps ~ its 2000.
# python train.py config/digits_pretrain_scfm.py   (a plain-FM warm-up, as early EMA targets are meaningless, at the
# same compute, 800 x 192 + 1029 x 224 ~ 2000 x 192: add --fm_warmup=800 --max_iters=1829)
exec(open('config/digits_teacher.py').read())  # the teacher's data, model, optimizer, EMA (model_ema.safetensors)
out_dir = 'out/digits_pretrain_scfm'
fm_ratio = 0.75          # flow matching on data, the rest self windows: near = fast EMA, far = slow EMA
shift_range = (1.0, 2.0)
max_iters = 1714
