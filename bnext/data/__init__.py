"""Data for the experiments: CIFAR-10 (read safely, downloaded if absent) or a built-in synthetic
image task, held on the training device as whole tensors, and a seeded, resumable batch iterator.

    ds = load_dataset("auto", device="cuda")        # CIFAR-10 if present or downloadable, else synthetic
    print(ds.source)                                 # says exactly which data was used, and why
    print(ds.statistics)                             # neighbour correlation, difference kurtosis, channel mean/std
    for step, (xb, yb) in enumerate(iterate_batches(ds.train_x, ds.train_y, 128, seed=0), start=0): ...

The package follows the data's path:
    errors.py     the exceptions (each names the file or source)
    cifar.py      CIFAR-10: the restricted unpickler, the batch reader, the checked download and extraction
    synthetic.py  the synthetic image task
    dataset.py    Dataset (tensors on a device, scaled per channel with the training set's statistics),
                  load_dataset, image_statistics, the batch order (batch_at, iterate_batches)
"""
from .cifar import (CIFAR10_CLASSES, CIFAR10_MD5, CIFAR10_URL, download_cifar10, extract_tar_safely, fetch_url,
                    find_cifar10, read_cifar10, read_cifar_batch, read_cifar_meta, restricted_load)
from .dataset import (Dataset, batch_at, channel_mean_std, default_data_dir, epoch_permutation, image_statistics,
                      iterate_batches, load_dataset, steps_per_epoch)
from .errors import (ChecksumError, CorruptFileError, DataError, DownloadError, UnsafeArchiveError,
                     UnsafePickleError)
from .synthetic import make_synthetic

__all__ = [
    "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_CLASSES",
    "DataError", "CorruptFileError", "UnsafePickleError", "DownloadError", "ChecksumError",
    "UnsafeArchiveError",
    "Dataset", "load_dataset", "default_data_dir",
    "read_cifar_batch", "read_cifar_meta", "read_cifar10", "find_cifar10", "download_cifar10",
    "fetch_url", "extract_tar_safely", "restricted_load",
    "make_synthetic", "channel_mean_std", "image_statistics",
    "steps_per_epoch", "epoch_permutation", "batch_at", "iterate_batches",
]
