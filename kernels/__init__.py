"""Compute paths for packed TBN layers (installed as ``hf_tbn.kernels``).

- :mod:`.backends`: the table of compute paths and the entries the layers call.
- :mod:`.torch_path`: the torch backend (the fallback), no compiler or Triton needed.
- :mod:`.native`: the compiled CPU kernel (``tbn_lut.c``, lookup tables; the CPU default).
- :mod:`.triton_tbn`: the Triton tile-reuse GEMM/GEMV kernel and its launcher.
- :mod:`.conv`: every Conv1d/Conv2d path (torch, or a kernel through unfold).

Nothing is imported here: run from a checkout's root, this folder is also importable as a
top-level ``kernels``, the name transformers imports while probing for Hugging Face's own
``kernels`` package (docs/foundation.md, package layout); an empty module passes that probe
harmlessly.
Triton is imported on first use.
"""
