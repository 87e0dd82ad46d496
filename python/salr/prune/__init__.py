"""Pruning one weight or a whole model: exact-count keep-masks (:mod:`.masks`), the criteria
magnitude / Wanda / SparseGPT (:mod:`.criteria`, :mod:`.sparsegpt`), and sequential block-by-block
calibration (:mod:`.calibration`)."""
