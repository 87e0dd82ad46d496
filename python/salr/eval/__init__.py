"""Measuring a model: perplexity on token windows (:mod:`.perplexity`), greedy decode speed
(:mod:`.generation`) and lm-evaluation-harness tasks (:mod:`.lm_eval`, optional). ``salr.perplexity``
is :func:`salr.eval.perplexity.perplexity` (the package does not re-export it: the name would hide
the module)."""
