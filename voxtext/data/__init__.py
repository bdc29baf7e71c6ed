"""Readers and writers of public training data layouts (CVPR 2025 BiomedSegFM npz)."""
