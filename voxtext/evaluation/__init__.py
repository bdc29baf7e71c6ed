"""Segmentation metrics (BiomedSegFM definitions) and evaluation reports."""
