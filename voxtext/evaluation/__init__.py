"""Evaluation: segmentation metrics (BiomedSegFM definitions) and reports; Med3DVLM report/VQA text metrics
(:mod:`.text_metrics`, :mod:`.vlm_eval`) and image-text retrieval recall (:mod:`.retrieval`)."""
