"""Neural network modules: DCFormer encoders and the ESICA segmentation model."""
