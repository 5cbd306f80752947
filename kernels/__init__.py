"""Compute paths for packed TBN layers (installed as ``hf_tbn.kernels``).

- :mod:`.torch_path`: the torch compute-reuse path (CPU default), no Triton needed.
- :mod:`.triton_tbn`: the Triton tile-reuse GEMM/GEMV kernel and its launcher.
- :mod:`.conv`: Conv1d/Conv2d on that kernel through unfold.
- :mod:`.dispatch`: which path a layer takes (``backend`` = "auto" | "torch" | "triton").

Only the torch path and the dispatcher are imported here; Triton is imported on first use.
"""

from .dispatch import resolve_backend, triton_available, triton_module
from .torch_path import packed_linear, unpack_signs

__all__ = ["packed_linear", "resolve_backend", "triton_available", "triton_module", "unpack_signs"]
