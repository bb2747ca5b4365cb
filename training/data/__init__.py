"""Training data: Delta tables -> torch tensors (the project's Petastorm replacement).

    from training.data import DeltaTorchLoader
    loader = DeltaTorchLoader("lake/criteo/gold/train", ["label", "dense", "sparse"], 4096,
                              rank=hvd.rank(), world_size=hvd.size(), seed=0)
    log_param("train_table_version", loader.version)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:            # dict[str, torch.Tensor]; len(loader) batches, same on every rank
            ...

See docs/loader.md.
"""
from training.data.convert import UnsupportedColumnError, column_to_tensor, table_to_tensors
from training.data.loader import VALID_KEY, DeltaTorchLoader
from training.data.sources import RowGroup, filesystem_for_table, lpt_assign

__all__ = [
    "VALID_KEY",
    "DeltaTorchLoader",
    "RowGroup",
    "UnsupportedColumnError",
    "column_to_tensor",
    "filesystem_for_table",
    "lpt_assign",
    "table_to_tensors",
]
