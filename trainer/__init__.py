"""The device side: datasets, augmentation, the local training loop."""
