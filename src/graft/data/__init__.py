"""Reading the raw image folder: decoding, layout, splits, manifest and its expectations."""
