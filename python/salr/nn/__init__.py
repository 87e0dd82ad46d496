"""Model-level building blocks every method shares: finding the decoder blocks and their linears in
a Hugging Face causal LM (:mod:`.models`) and the truncated-SVD residual adapter (:mod:`.svd`)."""
