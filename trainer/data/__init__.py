"""Training data: load CIFAR-10, (Fashion-)MNIST and .npz datasets, normalise,
augment and iterate them in seeded mini-batches.

One module per format (``cifar``, ``idx``, ``npz``), the shared ``Dataset`` and
checks (``dataset``), the spec dispatcher (``load``) and the batch pipeline
(``batches``); this package's namespace is the API callers use.
"""

from .batches import augment_crop_flip, batches, normalize
from .cifar import CIFAR10_CLASSES, CIFAR10_FIX, load_cifar10
from .dataset import Dataset, Stats, channel_stats
from .idx import (
                  FASHION_MNIST_CLASSES,
                  FASHION_MNIST_DIR,
                  FASHION_MNIST_FIX,
                  MNIST_CLASSES,
                  load_fashion_mnist,
                  load_idx,
                  load_mnist,
)
from .load import load_dataset
from .npz import load_npz

__all__ = ["CIFAR10_CLASSES", "CIFAR10_FIX", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR",
           "FASHION_MNIST_FIX", "MNIST_CLASSES", "Dataset", "Stats", "augment_crop_flip",
           "batches", "channel_stats", "load_cifar10", "load_dataset",
           "load_fashion_mnist", "load_idx", "load_mnist", "load_npz", "normalize"]
