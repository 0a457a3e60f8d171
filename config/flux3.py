# FLUX.1-dev -> 3-step sampler with SCFM, the official recipe (docs/method.md)
# 1. convert:  python convert_weights.py /path/to/flux1-dev.safetensors checkpoints/flux1-dev.safetensors
# 2. data:     teacher images + embeddings as shards in data/flux_teacher, --max_length 256 as the official run (README)
# 3. train:    python train.py config/flux3.py   (one GPU, as the official run; 8 GPUs: torchrun --nproc_per_node=8)
out_dir = 'out/flux3'
init_from = 'checkpoints/flux1-dev.safetensors'
data_dir = 'data/flux_teacher'
model = 'flux-dev'
# the official run's LoRA: rank 64 on every linear layer (its script's LORA_LAYERS), one adapter per diffusers linear
# (q, k, v and the MLP input of a fused BFL weight each get their own), A ~ N(0, std 1/rank), B = 0
lora_rank, lora_alpha = 64, 64.0
lora_layout, lora_init = 'split', 'gaussian'
teacher, teacher_ratio = 'lora_off', 0.4  # the teacher is the base model: LoRA scale 0
teacher_steps = 32
self_steps = (2, 4, 8, 16)
shift_range = (2.5, 4.5)
dyn_shift_prob = 0.1         # the official Flux code mixes in Flux's resolution-dependent shift 10% of the time
guidance_range = (0.0, 7.5)  # FLUX.1-dev is guidance-distilled: train every embedded-guidance value
ema_fast, ema_slow = 0.99, 0.999
ema_init = 'zero'            # both EMAs start at zeros, as in the official run
batch_size = 8               # global, as the official run (the paper: 16); 512 px (1024 latent tokens), 256 T5 tokens
lr = 2e-5
weight_decay, grad_clip = 1e-4, 10.0  # the official AdamW and gradient clipping
max_iters = 10000            # the official run has no limit; its demo loads the step-10000 checkpoint
ckpt_interval = 200
grad_ckpt = True
compile = True               # torch.compile each block (README, Performance)
dtype = 'bfloat16'
master_dtype = 'bfloat16'    # LoRA, AdamW state and EMAs in bf16 as the official run ('float32': fp32 masters)
