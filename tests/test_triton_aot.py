"""The Triton kernel compiled ahead of time for real GPUs (sm_80, sm_90) on this CPU machine, down to cubin.

Every configuration :func:`hf_tbn.kernels.triton_tbn._blocks` can choose (the GEMV form at ``M = 1``,
``M <= 16``, larger ``M`` on few or many tile rows) in every activation dtype, for both targets, through
:func:`triton_tbn.compile_ahead` (the launcher's own arguments, specialized as a launch would): a change that
would fail to compile on a GPU fails here. Rows on bytes or not (``ALIGNED``) and bias or none alternate so that
each (dtype, blocks, ``ALIGNED``) combination is compiled for one of the two targets. Runs in a fresh process (the
other test modules set ``TRITON_INTERPRET=1``, under which nothing is compiled), two compiles at a time, into a
fresh Triton cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def launch_jobs() -> list[tuple[int, str, int, int, int, bool]]:
    """``(arch, dtype, M, rows, K, bias)``: each block configuration ``_blocks`` gives for M up to 8192, K = 4096
    (or 4093, rows not on bytes) and 40 or 4096 tile rows, in each dtype."""
    from hf_tbn.kernels import triton_tbn  # _blocks only (the pytest process may run Triton interpreted)

    jobs = []
    for dtype_name, dtype in DTYPES.items():
        first = {}
        for m in range(8192, 0, -1):
            for rows in (4096, 40):
                first[triton_tbn._blocks(m, 4096, rows, dtype)] = (m, rows)
        for i, (m, rows) in enumerate(sorted(first.values())):
            for arch in (80, 90):
                aligned = (i + arch // 10) % 2 == 0  # sm_80 and sm_90 take the two row layouts in turn
                jobs.append((arch, dtype_name, m, rows, 4096 if aligned else 4093, i % 2 == 0))
    return jobs


WORKER = """
import json, sys
from concurrent.futures import ProcessPoolExecutor
import torch
from triton.backends.compiler import GPUTarget
from hf_tbn import tiling
from hf_tbn.kernels import triton_tbn

def compile_one(job):
    arch, dtype, m, rows, k, bias = job
    dtype, p = getattr(torch, dtype), 4
    tile = tiling.pack_bits(torch.randn(rows * k))
    x, alpha, b = torch.randn(m, k, dtype=dtype), torch.rand(p, dtype=dtype), torch.randn(p * rows, dtype=dtype)
    kernel = triton_tbn.compile_ahead(GPUTarget("cuda", arch, 32), x, tile, alpha, b if bias else None, rows)
    ptx = kernel.asm["ptx"]
    return {"job": job, "stages": list(kernel.asm), "cubin_bytes": len(kernel.asm["cubin"]),
            "blocks": triton_tbn._blocks(m, k, rows, dtype), "warps": kernel.metadata.num_warps,
            "num_stages": kernel.metadata.num_stages,
            "tensor_cores": "mma.sync" in ptx or "wgmma" in ptx}

with ProcessPoolExecutor(2) as pool:
    for result in pool.map(compile_one, json.loads(sys.argv[1])):
        print(json.dumps(result), flush=True)
"""


def test_every_launch_configuration_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    jobs = launch_jobs()
    assert len({(dtype, m, rows) for _, dtype, m, rows, _, _ in jobs}) >= 12  # 3 dtypes x (GEMV, M <= 16, small, large)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, not a cache hit
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated (it warns when unset)
    result = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(jobs)], capture_output=True, text=True, timeout=900, env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [json.loads(line) for line in result.stdout.splitlines()]
    assert [tuple(c["job"]) for c in compiled] == jobs
    for c in compiled:
        dtype = c["job"][1]
        assert c["stages"][-2:] == ["ptx", "cubin"] and c["cubin_bytes"] > 0, c
        assert (c["warps"], c["num_stages"]) == tuple(c["blocks"][3:]), c
        gemm = c["blocks"][0] > 1  # BLOCK_M = 1: the GEMV form, no dot
        assert c["tensor_cores"] == (gemm and dtype != "float32"), c  # fp16/bf16: mma.sync / wgmma; fp32: IEEE FMA
    layouts = {(dtype, m, rows, k % 8 == 0) for _, dtype, m, rows, k, _ in jobs}
    assert layouts == {(dtype, m, rows, aligned) for dtype, m, rows, _ in layouts for aligned in (True, False)}
