"""Compute paths for packed TBN layers.

- :mod:`.backends`: the table of backends (``"torch"``, ``"native"``, ``"triton"``; ``"auto"`` picks) and
  the two entries the layers call, ``linear`` and ``conv``.
- :mod:`.native`: the compiled CPU kernel (``tbn_lut.c``, lookup tables; the CPU default) and its build cache.
- :mod:`.torch_path`: the torch compute-reuse path (the fallback), no compiler or Triton needed.
- :mod:`.triton_tbn`: the Triton tile-reuse GEMM/GEMV kernel, its launcher and its ahead-of-time compile.
- :mod:`.ops`: the two compiled launchers as torch custom ops (fake implementations, the one backward).
- :mod:`.conv`: Conv1d/Conv2d on every backend (torch convs, or a kernel through unfold).

Nothing is imported here; Triton is imported on first use.
"""
