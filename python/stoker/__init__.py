"""stoker: a data loader for PyTorch whose engine is native, a drop-in for torch.utils.data.DataLoader."""

from stoker._arrays import ArrayDataset
from stoker._collate import default_collate
from stoker._dataloader import DataLoader

__all__ = ["ArrayDataset", "DataLoader", "default_collate"]
__version__ = "0.1.0"
