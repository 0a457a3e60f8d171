"""
A self-contained FLUX.1-compatible DiT, hand-written LoRA and the Flux autoencoder.

Parameter names are exactly the BFL names of `flux1-dev.safetensors` / `ae.safetensors`, so the project's
checkpoint format *is* the BFL format (convert_weights.py maps diffusers folders onto it).
No training logic lives here.
"""
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# DiT (written by the lead; the autoencoder section at the end of the file is separate)

# ----------------------------------------------------------------------------------------------------------
# Autoencoder
