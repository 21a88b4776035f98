"""Test-wide settings: tiny tensors run far faster on one intra-op thread."""

import torch

torch.set_num_threads(1)
