"""The machine has 2 shared cores: one torch thread per test process avoids oversubscription."""

import torch

torch.set_num_threads(1)
