"""A torch ``Dataset`` over a cache's patches, for training heads with torch's own data loading."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["PatchDataset"]


class PatchDataset(Dataset):
    """A torch ``Dataset`` over cached patches: items are ``(features float32, label, image_index)``.

    The file is opened lazily in each process, so it works with DataLoader workers.

    Parameters
    ----------
    path : path
        The cache file.
    indices : ndarray of int, optional
        File rows of the patches (a reader's ``indices``: its selection); default every patch.

    Examples
    --------
    >>> with FeatureCache("voc.h5", split="train") as cache:           # doctest: +SKIP
    ...     ds = PatchDataset(cache.path, cache.indices)
    """

    def __init__(self, path: Union[str, Path], indices: Optional[np.ndarray] = None) -> None:
        self.path = str(path)
        if indices is None:
            with h5py.File(self.path, "r") as f:
                indices = np.arange(len(f["label"]))
        self.indices = np.asarray(indices, dtype=np.int64)
        self._file = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        row = int(self.indices[i])
        f = self._file
        return (torch.from_numpy(f["features"][row].astype(np.float32)),
                int(f["label"][row]), int(f["image_index"][row]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state
