"""The compiled CPU kernel (``hf_tbn/kernels/tbn_lut.c``) against a float64 reference, its build and its dispatch."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_reference import TOL, random_tile, reference, rel_err, strided_row_offset_output

from hf_tbn import TBNLinear
from hf_tbn.kernels import backends, native


def test_kernel_builds_here() -> None:
    assert native.native_error() is None  # CI has gcc: the kernel must build, not silently fall back


# Rows below / above the 8-row block and the 224-row switch to byte tables; K spanning several
# table chunks (nibble tables: 2048 bytes per chunk at M = 1, 128 at 16 rows; byte tables 227 / 14).
SHAPES = [(8, 5), (72, 33), (136, 230), (1152, 12), (2048, 300), (16400, 3)]


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
def test_writes_every_output_and_matches(m: int, p: int) -> None:
    k, rows = SHAPES[(m + p) % len(SHAPES)]
    bits, alpha, bias = random_tile(rows, k, p, seed=m * 100 + p)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(p))
    buffer = torch.full((m, p * rows + 2), float("nan"))  # poisoned, one guard column each side
    out = buffer[:, 1:-1]
    assert native.tile_linear(x, bits, alpha, bias, rows, out=out) is out
    assert not out.isnan().any(), "some outputs were never written"
    assert buffer[:, 0].isnan().all() and buffer[:, -1].isnan().all(), "the kernel wrote outside its output"
    assert rel_err(out, reference(x, bits, alpha, bias, rows)) < TOL[torch.float32]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_every_lane_count(shape: tuple[int, int]) -> None:
    k, rows = shape
    bits, alpha, bias = random_tile(rows, k, 2, seed=k)
    x = torch.randn(33, k)  # blocks of 16 rows of x, a ragged last block, and single rows
    expected = reference(x, bits, alpha, bias, rows)
    assert rel_err(native.tile_linear(x, bits, alpha, bias, rows), expected) < 1e-5
    assert rel_err(native.tile_linear(x[:1], bits, alpha, bias, rows), expected[:1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_strided_row_offset_no_bias(dtype: torch.dtype) -> None:
    y = strided_row_offset_output(native.tile_linear, dtype, rows=40, k=64, row0=3, p=4, m=6, seed=5)
    assert y.dtype == dtype and y.shape == (6, 4 * 40)


def test_threads_give_the_same_result() -> None:
    bits, alpha, bias = random_tile(300, 512, 4, seed=1)
    x = torch.randn(20, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.tile_linear(x, bits, alpha, bias, 300)
        torch.set_num_threads(2)
        two = native.tile_linear(x, bits, alpha, bias, 300)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # every sum is taken in the same order whatever the thread count


def test_rejects_bad_arguments() -> None:
    bits, alpha, bias = random_tile(4, 16, 2, seed=0)
    with pytest.raises(ValueError, match="K must be a multiple of 8 .* got K=12"):
        native.tile_linear(torch.randn(2, 12), bits, alpha, bias[:6], 3)
    with pytest.raises(ValueError, match="x must be a CPU tensor"):
        native.tile_linear(torch.randn(2, 16, dtype=torch.float64), bits, alpha, bias, 4)
    with pytest.raises(ValueError, match="tile must be 1-D uint8 holding 80 values"):
        native.tile_linear(torch.randn(2, 16), bits, alpha, bias, 5)
    with pytest.raises(ValueError, match="bias has 8 values, expected p \\* rows = 6"):
        native.tile_linear(torch.randn(2, 16), bits, alpha, bias, 3)
    with pytest.raises(ValueError, match="out must be torch.float32 \\(2, 8\\)"):
        native.tile_linear(torch.randn(2, 16), bits, alpha, bias, 4, out=torch.empty(2, 9))


def test_layer_dispatch_on_cpu() -> None:
    aligned = TBNLinear(64, 32, compression_factor=4, name="fc").pack()
    ragged = TBNLinear(20, 32, compression_factor=4, name="odd").pack()
    x64, x20 = torch.randn(2, 64), torch.randn(2, 20)
    assert backends.resolve("auto", x64, "linear", 64, "fc").name == "native"
    assert backends.resolve("auto", x20, "linear", 20, "odd").name == "torch"  # rows not on bytes: the torch path
    assert backends.resolve("auto", x64.double(), "linear", 64, "fc").name == "torch"
    assert backends.resolve("auto", x64, "conv", 72, "conv").name == "torch"  # convs stay on F.conv2d
    ragged.backend = "native"
    with pytest.raises(ValueError, match="odd: backend='native' .* multiple of 8 values .* got 20"):
        ragged(x20)
    aligned.backend = "native"
    with pytest.raises(ValueError, match="fc: backend='native' .* got torch.float64"):
        aligned(x64.double())
    with torch.no_grad():
        torch.testing.assert_close(aligned(x64), aligned.dense_module()(x64), rtol=1e-5, atol=1e-5)


def run_python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def unusable_setups(tmp_path: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Environments where the kernel cannot be had -> (environment changes, the reason it gives)."""
    broken_cc = tmp_path / "broken-cc"
    broken_cc.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken_cc.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    return {
        "no compiler": ({"CC": "", "PATH": str(Path(sys.executable).parent)}, "no C compiler found"),
        "build fails": (
            {"CC": str(broken_cc)}, f"{broken_cc} could not build tbn_lut.c, int8_rows.c:\nbroken compiler"
        ),
        "shared cache": ({"HF_TBN_CACHE": str(shared)}, f"refusing the kernel cache folder {shared}: it is writable"),
    }


@pytest.mark.parametrize("setup", ["no compiler", "build fails", "shared cache"])
def test_unusable_kernel_auto_warns_and_native_says_why(setup: str, tmp_path: Path) -> None:
    code = (
        "import torch, hf_tbn\n"
        "layer = hf_tbn.TBNLinear(16, 8, compression_factor=2, name='fc').pack()\n"
        "layer(torch.randn(1, 16))\n"  # auto: the torch path, with a warning
        "layer.backend = 'native'\n"
        "try:\n    layer(torch.randn(1, 16))\nexcept ValueError as e:\n    print(e)\n"
    )
    changes, reason = unusable_setups(tmp_path)[setup]
    env = {**os.environ, "HF_TBN_CACHE": str(tmp_path / "c"), **changes}
    result = run_python(code, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "compiled CPU kernel is unavailable" in result.stderr and reason in result.stderr
    assert f"fc: backend='native' (the compiled CPU kernel) {reason}" in result.stdout


def test_row_ranges_outside_the_tile_are_refused_not_read(tmp_path: Path) -> None:
    """A negative or huge ``row0`` (or ``rows``) would read memory before or after the tile: every launcher refuses it.

    Run in a fresh process (a launcher reading outside the tile may crash it), with Triton interpreted.
    """
    code = (
        "import torch\n"
        "from hf_tbn.kernels import native, torch_path, triton_tbn\n"
        "tile, alpha, x = torch.zeros(8, dtype=torch.uint8), torch.ones(2), torch.randn(1, 16)\n"  # 4 rows of 16
        "for launcher in (native.tile_linear, torch_path.tile_linear, triton_tbn.tile_linear):\n"
        "    for rows, row0 in ((1, -1), (1, -2**40), (2, 2**40), (1, 2**62), (2, 3), (0, 0), (-1, 2)):\n"
        "        try:\n"
        "            launcher(x, tile, alpha, None, rows, row0)\n"
        "        except ValueError as e:\n"
        "            print('refused:', e)\n"
        "    print(launcher(x, tile, alpha, None, 2, 2).shape)\n"  # the last two rows: allowed
    )
    result = run_python(code, {**os.environ, "TRITON_INTERPRET": "1"}, tmp_path)
    assert result.returncode == 0, result.stderr  # a crash (SIGSEGV) gives a negative code
    refusals = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 3 * 7, result.stdout
    assert "native tile_linear: row0 must be an int >= 0, got -1" in refusals[0]
    need, rows = (2**40 + 2) * 16, f"rows {2**40} .. {2**40 + 2} of 16 values"
    assert f"tile must be 1-D uint8 holding {need} values ({rows}), got torch.uint8 (8,)" in refusals[2]
    assert "rows must be an int >= 1, got 0" in refusals[5]
    assert result.stdout.count("torch.Size([1, 4])") == 3


def test_cache_folder_empty_variable_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_TBN_CACHE", "")  # unset, not the working folder
    assert native.cache_dir() == tmp_path / "xdg" / "hf_tbn"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TBN_CACHE", "relative")
    assert native.cache_dir() == tmp_path / "relative"  # absolute: ctypes never searches the library path


def built(folder: Path) -> Path:
    native.load(folder)
    (library,) = folder.glob("tbn_lut-*.so")
    return library


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file at ``path`` (a new inode: a copy this process has mapped stays intact)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(path.stat().st_mode)
    os.replace(tmp, path)


def test_cache_folder_is_private_and_each_build_recorded(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "cache"
    library = built(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    digest, size = (folder / f"{library.name}.sha256").read_text().split()
    assert int(size) == library.stat().st_size and digest == hashlib.sha256(library.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "tamper",
    ["flipped byte", "record missing", "record garbage", "record of another file"],
)
def test_library_not_matching_its_build_is_rebuilt(tamper: str, tmp_path: Path) -> None:
    library = built(tmp_path)
    record = library.with_name(library.name + ".sha256")
    good = library.read_bytes()
    if tamper == "flipped byte":
        replace_file(library, good[:100] + bytes([good[100] ^ 1]) + good[101:])
    elif tamper == "record missing":
        record.unlink()
    else:
        replace_file(record, b"nonsense" if tamper == "record garbage" else f"{'0' * 64} {len(good)}\n".encode())
    native.load(tmp_path)
    assert library.read_bytes() == good  # rebuilt (the build is deterministic)
    assert record.read_text().split()[0] == hashlib.sha256(good).hexdigest()


def test_truncated_library_is_rebuilt_not_mapped(tmp_path: Path) -> None:
    """A truncated cached library with its old record: mapped, it would kill the process (SIGBUS)."""
    library = built(tmp_path)
    good = library.read_bytes()
    replace_file(library, good[: len(good) // 3])
    code = (
        "import torch\n"
        "from hf_tbn.kernels import native\n"
        "print(native.native_error())\n"
        "ones = torch.full((1,), 255, dtype=torch.uint8)\n"  # one tile row of eight +1
        "print(native.tile_linear(torch.ones(1, 8), ones, torch.ones(1), None, 1))\n"
    )
    result = run_python(code, {**os.environ, "HF_TBN_CACHE": str(tmp_path)}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "None" and "tensor([[8.]])" in result.stdout
    assert library.read_bytes() == good


@pytest.mark.parametrize("what", ["cache folder", "library", "checksum file"])
@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
def test_cache_others_can_write_is_refused(what: str, how: str, tmp_path: Path) -> None:
    if how == "owned by another user" and os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    library = built(tmp_path)
    record = library.with_name(library.name + ".sha256")
    path = {"cache folder": tmp_path, "library": library, "checksum file": record}[what]
    if how == "owned by another user":
        os.chown(path, os.getuid() + 4242, -1)
        expected = f"it is owned by uid {os.getuid() + 4242}, not by this user"
    else:
        path.chmod(path.stat().st_mode | 0o002)
        expected = "it is writable by group or others"
    refusal = f"refusing the kernel {what} {re.escape(str(path))}: {expected}"
    with pytest.raises(native.NativeUnavailable, match=refusal):
        native.load(tmp_path)


def test_build_is_cached_per_machine(tmp_path: Path) -> None:
    code = "from hf_tbn.kernels import native; print(native.native_error())"
    env = {**os.environ, "HF_TBN_CACHE": str(tmp_path)}
    first = run_python(code, env, tmp_path)
    assert first.stdout.strip() == "None", first.stderr
    built = list(tmp_path.glob("tbn_lut-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert run_python(code, env, tmp_path).stdout.strip() == "None"
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_processes_starting_at_once_build_once(tmp_path: Path) -> None:
    """Three processes find an empty cache together: one compiles (under the lock), the others load its build."""
    log, wrapper = tmp_path / "compiles.log", tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\n{native._compiler()} "$@" || exit $?\n'  # logs each successful build
                       f'case " $* " in *" -shared "*) echo build >> {log} ;; esac\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "HF_TBN_CACHE": str(tmp_path / "cache"), "CC": str(wrapper)}
    code = "from hf_tbn.kernels import native; print(native.native_error())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [out.strip() for out, _ in outputs] == ["None"] * 3, outputs
    assert log.read_text().splitlines() == ["build"]


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize(("n", "k"), [(7, 40), (64, 576), (3, 9)])  # ragged blocks of 4 rows, K % 16 != 0
def test_int8_rows_linear_matches_float64(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * k + m)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) + 0.1
    x = torch.randn(m, k, generator=gen)
    expected = x.double() @ (codes.double() * scale.double()[:, None]).T
    assert rel_err(native.int8_linear(x, codes, scale), expected) < 1e-6


def test_int8_rows_linear_refuses_wrong_operands() -> None:
    codes, scale, x = torch.zeros(4, 16, dtype=torch.int8), torch.ones(4), torch.ones(1, 16)
    for bad_codes, bad_scale in ((codes.to(torch.uint8), scale), (codes[:, :8], scale), (codes, scale.half())):
        with pytest.raises(ValueError, match="codes must be int8"):
            native.int8_linear(x, bad_codes, bad_scale)
