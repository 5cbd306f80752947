"""Compute paths for packed TBN layers (installed as ``hf_tbn.kernels``).

- :mod:`.native`: the compiled CPU kernel (``tbn_lut.c``, lookup tables; the CPU default).
- :mod:`.torch_path`: the torch compute-reuse path (the fallback), no compiler or Triton needed.
- :mod:`.triton_tbn`: the Triton tile-reuse GEMM/GEMV kernel and its launcher.
- :mod:`.conv`: Conv1d/Conv2d on either kernel through unfold.
- :mod:`.tile_ops`: the argument checks and the autograd op shared by the kernels.
- :mod:`.dispatch`: which path a layer takes (``backend`` = "auto" | "torch" | "native" | "triton").

Nothing is imported here: run from a checkout's root, this folder is also importable as a
top-level ``kernels``, the name transformers imports while probing for Hugging Face's own
``kernels`` package (DESIGN.md section 3); an empty module passes that probe harmlessly.
Triton is imported on first use.
"""
