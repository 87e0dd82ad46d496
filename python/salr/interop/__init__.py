"""Interoperability with the ecosystem around salr:

* :mod:`salr.interop.hf`: salr's ``save_pretrained``-style directories (``salr.save`` / ``salr.load``)
  and the way back to a plain transformers model (:func:`~salr.interop.hf.to_transformers`);
* :mod:`salr.interop.compressed_tensors`: compressed-tensors' ``sparse-bitmask`` checkpoints (as
  llm-compressor writes them) to and from salr's BM8x8 layers;
* :mod:`salr.interop.peft`: PEFT LoRA adapters onto salr layers, and salr's adapters out as one.

Submodules import lazily (``from salr.interop import peft``); nothing here needs the optional
packages until a function that reads their files is called.
"""
