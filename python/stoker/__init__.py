"""stoker: a data loader for PyTorch whose engine is native, a drop-in for torch.utils.data.DataLoader."""

from stoker._arrays import ArrayDataset
from stoker._collate import default_collate
from stoker._cuda import cuda_available
from stoker._dataloader import DataLoader
from stoker._normalize import Normalize, normalize
from stoker._packing import PackedLoader, TokenDataset, write_token_files
from stoker._varlen import LengthBucketSampler, PadCollate, TokenBudgetSampler

__all__ = [
    "ArrayDataset",
    "DataLoader",
    "LengthBucketSampler",
    "Normalize",
    "PackedLoader",
    "PadCollate",
    "TokenBudgetSampler",
    "TokenDataset",
    "cuda_available",
    "default_collate",
    "normalize",
    "write_token_files",
]
__version__ = "0.1.0"
