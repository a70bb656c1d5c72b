# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Options shared by the tests that run the training bundle: a tiny, quick, CPU-only run."""

#: train.json options of a tiny one-epoch CPU run (no previews, no progress bars)
SMALL_TRAIN = {
    "image_size": 32,
    "network_size": "tiny",
    "batch_size": 8,
    "val_batch_size": 16,
    "num_workers": 0,
    "num_epochs": 1,
    "preview_interval": 0,
    "progress": False,
    "device": "cpu",
}
