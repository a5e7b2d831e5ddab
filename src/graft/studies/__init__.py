"""Studies around the pipeline, not part of it: which backbone (selection), how many images
(kshot), and whether pretraining on a source task pays (pretrain, transfer)."""
