"""Triton kernels for packed TBN layers (installed as ``hf_tbn.kernels``)."""
