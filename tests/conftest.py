import os
import sys

# tests import the top-level scripts' modules (model.py, convert_weights.py, ...) from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing may be downloaded
