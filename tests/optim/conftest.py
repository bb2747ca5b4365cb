"""tests/optim: tiny problems, one torch thread (the machine has 2 shared cores)."""

import torch

torch.set_num_threads(1)
