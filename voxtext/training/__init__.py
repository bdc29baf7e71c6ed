"""Training of the segmentation model (single process, torchrun DDP)."""
