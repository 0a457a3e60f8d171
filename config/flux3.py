# FLUX.1-dev -> 3-step sampler with SCFM, the official recipe (docs/method.md)
# 1. convert:  python convert_weights.py /path/to/flux1-dev.safetensors checkpoints/flux1-dev.safetensors
# 2. data:     teacher images + embeddings as shards in data/flux_teacher (README, Data)
# 3. train:    torchrun --standalone --nproc_per_node=8 train.py config/flux3.py   (1 GPU: add --grad_accum=16)
out_dir = 'out/flux3'
init_from = 'checkpoints/flux1-dev.safetensors'
data_dir = 'data/flux_teacher'
model = 'flux-dev'
lora_rank, lora_alpha = 64, 64.0  # LoRA on every linear layer of the DiT
teacher, teacher_ratio = 'lora_off', 0.4  # the teacher is the base model: LoRA scale 0
teacher_steps = 32
self_steps = (2, 4, 8, 16)
shift_range = (2.5, 4.5)
dyn_shift_prob = 0.1         # the official Flux code mixes in Flux's resolution-dependent shift 10% of the time
guidance_range = (0.0, 7.5)  # FLUX.1-dev is guidance-distilled: train every embedded-guidance value
ema_fast, ema_slow = 0.99, 0.999
batch_size = 16              # global; 512 px images (1024 latent tokens) and 512 T5 tokens
lr = 2e-5
max_iters = 3000
ckpt_interval = 200
grad_ckpt = True
compile = True               # torch.compile each block (README, Performance)
dtype = 'bfloat16'
