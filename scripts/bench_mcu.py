"""Cortex-M4 side by side: hf-tbn exports against a CMSIS-NN int8 baseline, same harness and board.

For the paper's MLP (784-128-10, fc1 tiled, fc2 p=1) and the small CNN of
hf_tbn.demos.fashion_mnist it builds: the float32 export, a CMSIS-NN int8 build of the same
float model (post-training quantization calibrated on training images: int8 weights,
per-channel for convolutions, int8 activations; `arm_fully_connected_s8`,
`arm_convolve_wrapper_s8`, `arm_max_pool_s8`, `arm_avgpool_s8`, DSP/SMLAD paths), the binary
p=1 export and the TBN exports at p=2/4/8 (MLP: fc1; CNN: conv2). Each runs on qemu
mps2-an386 under -icount shift=0 through tbn_harness.c (float in, float out: the int8 build
quantizes its input and dequantizes its output inside the timed call). Reported: instructions
per inference, flash (code + constants of the model alone) and RAM (its static data), weight
bytes, and agreement: every hf-tbn export against PyTorch on the host and on the board
(max relative error, identical argmax), the int8 build's argmax against the float model's.

    .venv/bin/python scripts/bench_mcu.py --doc docs/mcu.md      # the table of docs/mcu.md
    .venv/bin/python scripts/bench_mcu.py --quick                # untrained, few images (the test)
    .venv/bin/python scripts/bench_mcu.py --thresholds           # nibble vs pair tables by rows

CMSIS-NN is compiled from --cmsis (its source tree, read in place, never copied).
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from doc_blocks import replace_block
from torch import nn

from hf_tbn import TBNLinear, mcu_export
from hf_tbn.demos import fashion_mnist as demo
from hf_tbn.mcu_export import toolchain as tc
from hf_tbn.mcu_export.codegen import c_float
from hf_tbn.mcu_export.lower import Op, PoolOp, ReluOp, WeightedOp, lower, prepare

DEFAULT_CMSIS = Path(__file__).resolve().parents[2] / "shared" / "third_party" / "cmsis-nn"
CMSIS_DIRS = ("FullyConnectedFunctions", "ConvolutionFunctions", "NNSupportFunctions", "PoolingFunctions")
HEADER = ("| model | variant | weight bytes | flash B | RAM B | instructions / inference | vs CMSIS-NN int8 "
          "| agreement |")
MAX_REL_ERR = 1e-4


@dataclass(frozen=True)
class Row:
    family: str
    variant: str
    weight_bytes: int
    flash: int
    ram: int
    instructions: float
    agreement: str


# -- the int8 baseline ---------------------------------------------------------------------------------------------


def _float_outputs(ops: list[Op], x: torch.Tensor) -> list[torch.Tensor]:
    """Each lowered op's output on x (batch first), the float reference of the int8 build."""
    outs = []
    for op in ops:
        if isinstance(op, WeightedOp):
            g = op.geometry
            if g is None:
                x = F.linear(x.flatten(1), op.weight, op.bias)
            else:
                x = F.conv2d(x, op.weight, op.bias, (g.stride_h, g.stride_w), (g.pad_h, g.pad_w), (g.dil_h, g.dil_w))
        elif isinstance(op, ReluOp):
            x = F.relu(x)
        elif isinstance(op, PoolOp):
            g = op.geometry
            pool = F.avg_pool2d if op.average else F.max_pool2d
            x = pool(x, (g.k_h, g.k_w), (g.stride_h, g.stride_w), (g.pad_h, g.pad_w))
        else:
            raise ValueError(f"{op.name}: {op.kind} has no int8 baseline here")
        outs.append(x)
    return outs


def _multiplier(real: float) -> tuple[int, int]:
    """TFLite's (Q31 multiplier, shift) with real = multiplier / 2^31 * 2^shift."""
    mantissa, shift = math.frexp(real)
    q = round(mantissa * (1 << 31))
    if q == 1 << 31:
        q, shift = q // 2, shift + 1
    return q, shift


def _range(t: torch.Tensor) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero point) covering t and 0."""
    lo, hi = min(t.min().item(), 0.0), max(t.max().item(), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(round(-128 - lo / scale))


def _ints(ctype: str, name: str, values: list[int]) -> str:
    return f"static const {ctype} {name}[{len(values)}] = {{{', '.join(str(v) for v in values)}}};"


def cmsis_program(model: nn.Module, input_shape: tuple[int, ...], calib: torch.Tensor, cmsis: Path,
                  directory: Path) -> tuple[tc.Program, int]:
    """C of ``model`` (float layers only) on CMSIS-NN int8, and its weight bytes (int8 weights + int32 biases)."""
    with torch.no_grad():
        ops = lower(prepare(model), input_shape)
        outs = _float_outputs(ops, calib)
    # ReLU right after a layer is the layer's activation clamp (its output range starts at 0).
    fused = {i for i, op in enumerate(ops) if isinstance(op, ReluOp) and i and isinstance(ops[i - 1], WeightedOp)}
    in_scale = max(calib.abs().max().item(), 1e-8) / 127.0
    scale, zp = in_scale, 0
    consts, body, weight_bytes, biggest, scratch = [], [], 0, 0, 0
    shape = tuple(input_shape)  # CHW of the current tensor (stored NHWC on the board)
    src, dst = "buf0", "buf1"
    for i, op in enumerate(ops):
        if i in fused:
            continue
        name = f"l{i}"
        out = outs[i + 1] if i + 1 in fused else outs[i]
        if isinstance(op, WeightedOp):
            out_scale, out_zp = _range(out)
            w = op.weight.double()
            g = op.geometry
            if g is None:
                if len(shape) == 3:  # flattened CHW -> the NHWC order of the int8 tensor
                    c, h, wd = shape
                    w = w.view(-1, c, h, wd).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
                w_scale = torch.full((w.shape[0],), max(w.abs().max().item(), 1e-12) / 127.0, dtype=torch.float64)
            else:
                w = w.permute(0, 2, 3, 1)
                w_scale = w.flatten(1).abs().amax(1).clamp_min(1e-12) / 127.0
            q = torch.round(w / w_scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int64)
            bias = op.bias.double() if op.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            qb = torch.round(bias / (scale * w_scale)).to(torch.int64)
            consts.append(_ints("int8_t", f"{name}_w", q.flatten().tolist()))
            consts.append(_ints("int32_t", f"{name}_b", qb.tolist()))
            weight_bytes += q.numel() + 4 * qb.numel()
            act = "{-128, 127}" if i + 1 not in fused else f"{{{out_zp}, 127}}"
            if g is None:
                mult, shift = _multiplier(scale * w_scale[0].item() / out_scale)
                out_n = w.shape[0]
                body.append(
                    f"    {{ const cmsis_nn_fc_params p = {{{-zp}, 0, {out_zp}, {act}}};\n"
                    f"      const cmsis_nn_per_tensor_quant_params qp = {{{mult}, {shift}}};\n"
                    f"      const cmsis_nn_dims id = {{1, 1, 1, {w.shape[1]}}}, fd = {{{w.shape[1]}, 1, 1, {out_n}}}, "
                    f"bd = {{1, 1, 1, {out_n}}}, od = {{1, 1, 1, {out_n}}};\n"
                    f"      if (arm_fully_connected_s8(&ctx, &p, &qp, &id, {src}, &fd, {name}_w, &bd, {name}_b, &od, "
                    f"{dst}) != ARM_CMSIS_NN_SUCCESS) return -1; }}")
                shape = (out_n,)
            else:
                pairs = [_multiplier(scale * s / out_scale) for s in w_scale.tolist()]
                consts.append(_ints("int32_t", f"{name}_m", [m for m, _ in pairs]))
                consts.append(_ints("int32_t", f"{name}_s", [s for _, s in pairs]))
                need = 4 * g.in_c * g.k_h * g.k_w + 64
                scratch = max(scratch, need)
                body.append(
                    f"    {{ const cmsis_nn_conv_params p = {{{-zp}, {out_zp}, {{{g.stride_w}, {g.stride_h}}}, "
                    f"{{{g.pad_w}, {g.pad_h}}}, {{{g.dil_w}, {g.dil_h}}}, {act}}};\n"
                    f"      const cmsis_nn_per_channel_quant_params qp = "
                    f"{{(int32_t *){name}_m, (int32_t *){name}_s}};\n"
                    f"      const cmsis_nn_dims id = {{1, {g.in_h}, {g.in_w}, {g.in_c}}}, "
                    f"fd = {{{g.out_c}, {g.k_h}, {g.k_w}, {g.in_c}}}, bd = {{1, 1, 1, {g.out_c}}}, "
                    f"od = {{1, {g.out_h}, {g.out_w}, {g.out_c}}};\n"
                    f"      if (arm_convolve_wrapper_s8_get_buffer_size(&p, &id, &fd, &od) > {need}) return -2;\n"
                    f"      if (arm_convolve_wrapper_s8(&ctx, &p, &qp, &id, {src}, &fd, {name}_w, &bd, {name}_b, &od, "
                    f"{dst}) != ARM_CMSIS_NN_SUCCESS) return -1; }}")
                shape = (g.out_c, g.out_h, g.out_w)
            scale, zp = out_scale, out_zp
        elif isinstance(op, PoolOp):
            g = op.geometry
            fn = "arm_avgpool_s8" if op.average else "arm_max_pool_s8"
            need = 4 * g.in_c + 64
            scratch = max(scratch, need)
            check = (f"      if (arm_avgpool_s8_get_buffer_size({g.out_w}, {g.in_c}) > {need}) return -2;\n"
                     if op.average else "")
            body.append(
                f"    {{ const cmsis_nn_pool_params p = {{{{{g.stride_w}, {g.stride_h}}}, {{{g.pad_w}, {g.pad_h}}}, "
                f"{{-128, 127}}}};\n"
                f"      const cmsis_nn_dims id = {{1, {g.in_h}, {g.in_w}, {g.in_c}}}, fd = {{1, {g.k_h}, {g.k_w}, 1}}, "
                f"od = {{1, {g.out_h}, {g.out_w}, {g.out_c}}};\n{check}"
                f"      if ({fn}(&ctx, &p, &id, {src}, &fd, &od, {dst}) != ARM_CMSIS_NN_SUCCESS) return -1; }}")
            shape = (g.out_c, g.out_h, g.out_w)
        else:  # a ReLU not after a layer: a clamp at the zero point, in place
            body.append(f"    {{ uint32_t k; for (k = 0; k < {math.prod(op.out_shape)}u; ++k) "
                        f"if ({src}[k] < {zp}) {src}[k] = {zp}; }}")
            continue
        biggest = max(biggest, math.prod(op.out_shape))
        src, dst = dst, src
    n_in, n_out = math.prod(input_shape), math.prod(shape)
    size = max(biggest, n_in)
    source = "\n".join([
        "/* CMSIS-NN int8 baseline generated by scripts/bench_mcu.py. */",
        '#include "cmsis_model.h"',
        "#include <stdint.h>",
        '#include "arm_nnfunctions.h"',
        *consts,
        f"static int8_t buf0[{size}], buf1[{size}];",
        f"static int8_t scratch[{max(scratch, 4)}];",
        "int cmsis_model_run(const float *in, float *out) {",
        f"    cmsis_nn_context ctx = {{scratch, {max(scratch, 4)}}};",
        "    uint32_t k;",
        f"    for (k = 0; k < {n_in}u; ++k) {{",
        f"        const float v = in[k] * {c_float(1.0 / in_scale, 'input scale')};",
        "        const int32_t r = (int32_t)(v >= 0.0f ? v + 0.5f : v - 0.5f);",
        "        buf0[k] = (int8_t)(r > 127 ? 127 : r < -128 ? -128 : r);",
        "    }",
        *body,
        f"    for (k = 0; k < {n_out}u; ++k) out[k] = (float)({src}[k] - ({zp})) * {c_float(scale, 'output scale')};",
        "    return 0;",
        "}",
        "",
    ])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cmsis_model.c").write_text(source)
    (directory / "cmsis_model.h").write_text(
        "#ifndef CMSIS_MODEL_H\n#define CMSIS_MODEL_H\nint cmsis_model_run(const float *in, float *out);\n#endif\n")
    mcu_export.export_model(nn.Sequential(nn.Identity()), (1,), directory / "board")  # the harness and board files
    for f in (directory / "board").iterdir():
        if f.name.startswith("tbn_") and f.suffix in (".c", ".ld", ".h"):
            (directory / f.name).write_bytes(f.read_bytes())
    library = tuple(sorted(p for d in CMSIS_DIRS for p in (cmsis / "Source" / d).glob("*.c")
                           if re.search(r"_s8|q7_to_q15", p.name)))
    flags = (f"-I{cmsis / 'Include'}",)
    prog = tc.Program(directory, "cmsis_model", (directory / "cmsis_model.c",), n_in, n_out, library, flags)
    return prog, weight_bytes


# -- measurement ---------------------------------------------------------------------------------------------------


def measure_export(family: str, variant: str, model: nn.Module, shape: tuple[int, ...], images: torch.Tensor,
                   board_images: int, workdir: Path) -> Row:
    """Export, check host and board against PyTorch (raises on a mismatch), measure."""
    with torch.no_grad():
        ref = model.eval()(images).flatten(1)
    export = mcu_export.export_model(model, shape, workdir)
    host = tc.run_host(export, tc.build_host(export), images)
    board = tc.run_board(export, tc.build_board(export), images[:board_images])
    errs = (tc.rel_err(host, ref), tc.rel_err(board.outputs, ref[:board_images]))
    same = torch.equal(host.argmax(1), ref.argmax(1)) and torch.equal(board.outputs.argmax(1),
                                                                        ref[:board_images].argmax(1))
    if max(errs) > MAX_REL_ERR or not same:
        raise RuntimeError(f"{family} {variant}: C disagrees with PyTorch (rel err {errs}, argmax same {same})")
    fp = tc.footprint(export)
    agreement = f"= PyTorch (rel. err <= {max(errs):.0e}, argmax {len(images)} host / {board_images} board)"
    return Row(family, variant, export.plan.generated.weight_bytes, fp.flash, fp.ram,
               board.instructions_per_inference, agreement)


def measure_cmsis(family: str, model: nn.Module, shape: tuple[int, ...], calib: torch.Tensor, images: torch.Tensor,
                  board_images: int, cmsis: Path, workdir: Path) -> Row:
    """The int8 baseline of the float ``model``: board run, argmax agreement with the float model."""
    prog, weight_bytes = cmsis_program(model, shape, calib, cmsis, workdir)
    board = tc.run_board(prog, tc.build_board(prog), images[:board_images])
    with torch.no_grad():
        ref = model.eval()(images[:board_images]).flatten(1)
    same = (board.outputs.argmax(1) == ref.argmax(1)).float().mean().item()
    fp = tc.footprint(prog)
    return Row(family, "CMSIS-NN int8", weight_bytes, fp.flash, fp.ram, board.instructions_per_inference,
               f"argmax = float32 model on {same:.1%} of {board_images} board images")


VARIANTS: dict[str, tuple[tuple[str, Callable[[], nn.Module]], ...]] = {
    "MLP 784-128-10": (
        ("float32 export", lambda: demo.mlp(None, None)),
        ("binary p=1", lambda: demo.mlp(1, 1)),
        ("TBN fc1 p=2", lambda: demo.mlp(2, 1)),
        ("TBN fc1 p=4", lambda: demo.mlp(4, 1)),
        ("TBN fc1 p=8", lambda: demo.mlp(8, 1)),
    ),
    "CNN": (
        ("float32 export", lambda: demo.cnn(None, None, None)),
        ("binary p=1", lambda: demo.cnn(1, 1, 1)),
        ("TBN conv2 p=2", lambda: demo.cnn(1, 2, 1)),
        ("TBN conv2 p=4", lambda: demo.cnn(1, 4, 1)),
        ("TBN conv2 p=8", lambda: demo.cnn(1, 8, 1)),
    ),
}


def table(rows: list[Row]) -> str:
    base = {r.family: r.instructions for r in rows if r.variant == "CMSIS-NN int8"}
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in rows:
        speed = f"x{base[r.family] / r.instructions:.2f}" if r.family in base else ""
        lines.append(f"| {r.family} | {r.variant} | {r.weight_bytes:,} | {r.flash:,} | {r.ram:,} "
                     f"| {r.instructions:,.0f} | {speed} | {r.agreement} |")
    return "\n".join(lines)


def thresholds(workdir: Path) -> str:
    """Instructions of one tiled linear layer (144 inputs) by tile rows, nibble against pair tables."""
    lines = ["| tile rows | nibble tables | pair tables |", "|---|---|---|"]
    x = torch.randn(2, 144)
    for rows in (1, 2, 3, 4, 5, 6, 8, 12, 16):
        model = nn.Sequential(TBNLinear(144, rows, bias=False, compression_factor=1))
        counts = []
        for kind, threshold in (("nibble", 1), ("pair", 10**9)):
            export = mcu_export.export_model(model, (144,), workdir / f"{rows}_{kind}", nibble_table_rows=threshold)
            counts.append(tc.run_board(export, tc.build_board(export), x).instructions_per_inference)
        lines.append(f"| {rows} | {counts[0]:,.0f} | {counts[1]:,.0f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cmsis", type=Path, default=DEFAULT_CMSIS, help="CMSIS-NN source tree (read in place)")
    parser.add_argument("--quick", action="store_true", help="untrained models, 20 images (for the tests)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of each model before measuring")
    parser.add_argument("--train-images", type=int, default=12000, help="training images (first of the train set)")
    parser.add_argument("--images", type=int, default=200, help="test images checked on the host")
    parser.add_argument("--board-images", type=int, default=20, help="test images run on the board")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds", action="store_true", help="measure nibble vs pair tables by tile rows")
    parser.add_argument("--doc", type=Path, default=None, help="markdown file whose bench block to rewrite")
    args = parser.parse_args()
    if not (args.cmsis / "Include" / "arm_nnfunctions.h").exists():
        parser.error(f"--cmsis {args.cmsis}: not a CMSIS-NN source tree (no Include/arm_nnfunctions.h)")
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="tbn_bench_") as tmp:
        if args.thresholds:
            print(thresholds(Path(tmp)))
            return
        if args.quick:
            epochs, n_images, n_board = 0, 20, 2
            gen = torch.Generator().manual_seed(args.seed)
            train_x, train_y = torch.randn(256, 1, 28, 28, generator=gen), torch.randint(0, 10, (256,), generator=gen)
            test_x = torch.randn(n_images, 1, 28, 28, generator=gen)
        else:
            epochs, n_images, n_board = args.epochs, args.images, args.board_images
            train_x, train_y = (t[: args.train_images] for t in demo.load_fashion_mnist("train"))
            test_x = demo.load_fashion_mnist("test")[0][:n_images]
        rows = []
        for family in VARIANTS:
            for variant, build in VARIANTS[family]:
                torch.manual_seed(args.seed)
                model = build()
                if epochs:
                    model = demo.train(model, train_x, train_y, epochs, args.seed)
                work = Path(tmp) / re.sub(r"\W+", "_", f"{family}_{variant}")
                rows.append(measure_export(family, variant, model.eval(), (1, 28, 28), test_x, n_board, work))
                print(rows[-1], flush=True)
                if variant == "float32 export":
                    rows.append(measure_cmsis(family, model, (1, 28, 28), train_x[:500], test_x, n_board, args.cmsis,
                                              work.with_name(work.name + "_cmsis")))
                    print(rows[-1], flush=True)
    budget = (f"models trained {epochs} epoch(s) (Adam, seed {args.seed}); host checks on {n_images} test images, "
              f"board on {n_board}; torch {torch.__version__}")
    text = f"{budget}\n\n{table(rows)}\n"
    print(text)
    if args.doc is not None:
        replace_block(args.doc, "bench", text)


if __name__ == "__main__":
    main()
