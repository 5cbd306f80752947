"""Turn lowered operations into a C99 header and source (constants in flash, one static arena)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch

from .lower import AffineOp, CombineOp, Geometry, Op, PoolOp, ReluOp, WeightedOp, column_groups

_VALUES_PER_LINE = 8
_HALFWORDS_PER_LINE = 12
_UINT16_MAX = 0xFFFF
# Tile rows from which 16-entry nibble tables beat 4-entry pair tables on the Cortex-M4
# (measured with scripts/bench_mcu.py --thresholds; docs/mcu.md).
NIBBLE_TABLE_ROWS = 5
# Floats of tables a linear tile layer builds at once (its inputs are taken in chunks).
TABLE_CHUNK_FLOATS = 1024
# Floats of column tables a tiled convolution holds at once (its output rows are taken in chunks of
# output positions; measured trade-off of RAM against columns built twice: docs/mcu.md).
CONV_TABLE_FLOATS = 4096


PREFIX_MAX_LEN = 48
# File stems of the runtime and board files copied next to the model (a prefix names <prefix>.c/.h).
RUNTIME_STEMS = ("tbn_runtime", "tbn_harness", "tbn_startup", "tbn_board")
C_KEYWORDS = frozenset(
    "auto break case char const continue default do double else enum extern float for goto if inline int long "
    "register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while "
    "_Bool _Complex _Imaginary main".split()
)


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can name the model's files and C symbols, else a ValueError saying why."""
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise ValueError(f"model name {prefix!r} is not a C identifier "
                         "(letters, digits and _, not starting with a digit)")
    if len(prefix) > PREFIX_MAX_LEN:
        raise ValueError(f"model name {prefix!r} is longer than {PREFIX_MAX_LEN} characters")
    lower = prefix.lower()
    if lower in RUNTIME_STEMS or lower.startswith("tbn_rt"):
        raise ValueError(f"model name {prefix!r} is reserved: it would overwrite or clash with the runtime files "
                         f"({', '.join(RUNTIME_STEMS)}) and symbols (tbn_rt_*)")
    if prefix in C_KEYWORDS or prefix.startswith("__") or re.match(r"_[A-Z]", prefix):
        raise ValueError(f"model name {prefix!r} is a C keyword or a name reserved by the C standard")
    return prefix


def c_identifier(text: str, max_len: int = 48) -> str:
    """A valid C identifier fragment for any text: other characters become ``_``."""
    ident = re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]", "_", text)).strip("_")[:max_len].strip("_")
    if not ident or ident[0].isdigit():
        ident = "m_" + ident
    return ident


def c_float(value: float, where: str) -> str:
    """A float32 literal that reads back exactly (9 significant digits)."""
    if not math.isfinite(value):
        raise ValueError(f"{where}: non-finite value {value} cannot be exported")
    text = f"{value:.9g}"
    if not any(c in text for c in ".en"):
        text += ".0"
    return text + "f"


@dataclass(frozen=True)
class Generated:
    """The generated C text and the sizes it commits to."""

    header: str
    source: str
    weight_bytes: int
    const_bytes: int
    arena_bytes: int
    input_size: int
    output_size: int


class _Emitter:
    """Collects the const arrays of one model, counting their bytes."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.const_bytes = 0
        self.weight_bytes = 0

    def floats(self, name: str, values: torch.Tensor, where: str, weight: bool = False) -> str:
        items = [c_float(v, where) for v in values.flatten().tolist()]
        self._array("float", name, items, _VALUES_PER_LINE, 4 * len(items), weight)
        return name

    def halfwords(self, name: str, packed: torch.Tensor) -> str:
        """Packed bytes as little-endian ``uint16_t`` values (an even number of bytes)."""
        data = packed.tolist()
        items = [f"0x{data[i] | data[i + 1] << 8:04x}" for i in range(0, len(data), 2)]
        self._array("uint16_t", name, items, _HALFWORDS_PER_LINE, len(data), True)
        return name

    def geometry(self, name: str, g: Geometry, where: str) -> str:
        values = [getattr(g, f.name) for f in fields(Geometry)]
        if max(values) > _UINT16_MAX:
            raise ValueError(f"{where}: a dimension exceeds {_UINT16_MAX}: {g}")
        self.lines.append(f"static const tbn_rt_geom_t {name} = {{{', '.join(str(v) for v in values)}}};")
        self.const_bytes += 2 * len(values)
        return "&" + name

    def _array(self, ctype: str, name: str, items: list[str], per_line: int, nbytes: int, weight: bool) -> None:
        rows = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
        self.lines.append(f"static const {ctype} {name}[{len(items)}] = {{")
        self.lines.extend(f"    {row}," for row in rows)
        self.lines.append("};")
        self.const_bytes += nbytes
        self.weight_bytes += nbytes if weight else 0


def _comment(text: str) -> str:
    """Text safe inside a C block comment (module names may hold any character; no trigraphs)."""
    return re.sub(r"[^ -~]|\?", "_", text).replace("*/", "* /").replace("/*", "/ *")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _plan_buffers(ops: list[Op]) -> tuple[bool, list[int], list[int]]:
    """Ping-pong plan: whether the input is copied first, the buffer (0/1) each op writes, sizes in floats.

    The first op that writes a new buffer reads the caller's input directly; an in-place op
    first needs the input copied into buffer 0.
    """
    sizes, current, writes, copy_input = [0, 0], -1, [], False
    for op in ops:
        if op.inplace and current < 0:
            copy_input, current = True, 0
            sizes[0] = _numel(op.in_shape)
        elif not op.inplace:
            current = 1 - current if current >= 0 else 0
        sizes[current] = max(sizes[current], _numel(op.out_shape))
        writes.append(current)
    return copy_input, writes, sizes


def table_kind(op: WeightedOp, nibble_table_rows: int) -> str:
    """The runtime's table kind for a tiled op: nibble tables from ``nibble_table_rows`` tile rows on."""
    return "TBN_RT_NIBBLE" if op.rows >= nibble_table_rows else "TBN_RT_PAIR"


def _scratch_floats(op: WeightedOp, nibble_table_rows: int) -> tuple[int, int]:
    """Scratch floats a tiled op needs, and the halfwords of input (linear) or the output positions of a row
    (convolution) whose tables are built at once."""
    if op.geometry is not None:  # the column being built, then the tables of a chunk's padded input columns
        g, column = op.geometry, 16 * column_groups(op.geometry)
        reach = (g.k_w - 1) * g.dil_w + 1
        chunk = max(1, min(g.out_w, (CONV_TABLE_FLOATS // column - reach) // g.stride_w + 1))
        return column // 4 + ((chunk - 1) * g.stride_w + reach) * column, chunk
    stride = math.ceil(op.row_length / 16)
    per_halfword = 32 if table_kind(op, nibble_table_rows) == "TBN_RT_PAIR" else 64  # TBN_RT_TABLE_FLOATS
    chunk = max(1, min(stride, TABLE_CHUNK_FLOATS // per_halfword))
    return chunk * per_halfword, chunk


def generate(ops: list[Op], input_shape: tuple[int, ...], output_shape: tuple[int, ...], prefix: str,
             description: str, nibble_table_rows: int = NIBBLE_TABLE_ROWS) -> Generated:
    """Header and source of the model ``prefix`` (``int <prefix>_run(const float *in, float *out)``).

    Tiled linear layers with at least ``nibble_table_rows`` tile rows use 16-entry nibble tables,
    the others 4-entry pair tables (the threshold is measured: docs/mcu.md); convolutions use nibble
    tables of their input columns.
    """
    prefix = check_prefix(prefix)
    macro = prefix.upper()
    input_size, output_size = _numel(input_shape), _numel(output_shape)
    copy_input, writes, sizes = _plan_buffers(ops)
    emitter = _Emitter()
    scratch = max([0] + [_scratch_floats(op, nibble_table_rows)[0]
                         for op in ops if isinstance(op, WeightedOp) and op.tile is not None])
    body: list[str] = [f"    tbn_rt_copy(in, buf0, {input_size}u);"] if copy_input else []
    current = 0 if copy_input else -1
    for index, (op, target) in enumerate(zip(ops, writes, strict=True)):
        base = f"{prefix}_l{index}_{c_identifier(op.name, 32)}"
        src, dst = ("in" if current < 0 else f"buf{current}"), f"buf{target}"
        body.append(f"    /* {_comment(f'{index}: {op.name} {op.kind} {op.in_shape} -> {op.out_shape}')} */")
        body.extend(_call(op, base, src, dst, emitter, nibble_table_rows))
        current = target
    body.append(f"    tbn_rt_copy({'in' if current < 0 else f'buf{current}'}, out, {output_size}u);")
    arena_floats = sizes[0] + sizes[1] + scratch
    offsets = {"buf0": 0, "buf1": sizes[0], "scratch": sizes[0] + sizes[1]}
    used = [f"buf{b}" for b in sorted(set(writes))] + (["scratch"] if scratch else [])
    pointers = [f"    float *const {b} = {prefix}_arena{' + ' + str(offsets[b]) + 'u' if offsets[b] else ''};"
                for b in used]
    arena = [f"/* The activation arena: ping-pong buffers of {sizes[0]} and {sizes[1]} floats, "
             f"then {scratch} floats of tile tables. */",
             f"static float {prefix}_arena[{max(arena_floats, 1)}];"]
    source = "\n".join([
        f"/* {_comment(description)}\n * Generated by hf_tbn.mcu_export; do not edit. */",
        f'#include "{prefix}.h"',
        "",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "",
        '#include "tbn_runtime.h"',
        "",
        *emitter.lines,
        "",
        *arena,
        "",
        f"int {prefix}_run(const float *in, float *out) {{",
        *pointers,
        "    if (in == NULL || out == NULL) return -1;",
        *body,
        "    return 0;",
        "}",
        "",
    ])
    header = "\n".join([
        f"/* {_comment(description)}\n * Generated by hf_tbn.mcu_export; do not edit. */",
        f"#ifndef {macro}_H",
        f"#define {macro}_H",
        "",
        f"#define {macro}_INPUT_SIZE {input_size}u  /* floats, shape {input_shape} */",
        f"#define {macro}_OUTPUT_SIZE {output_size}u  /* floats, shape {output_shape} */",
        f"#define {macro}_ARENA_BYTES {4 * arena_floats}u",
        f"#define {macro}_CONST_BYTES {emitter.const_bytes}u",
        "",
        "/* Runs the model on one input; returns 0, or -1 on a NULL pointer. Not reentrant. */",
        f"int {prefix}_run(const float *in, float *out);",
        "",
        f"#endif /* {macro}_H */",
        "",
    ])
    return Generated(header, source, emitter.weight_bytes, emitter.const_bytes, 4 * max(arena_floats, 1), input_size,
                     output_size)


def _call(op: Op, base: str, src: str, dst: str, emitter: _Emitter, nibble_table_rows: int) -> list[str]:
    """The runtime calls of one op; its constants go to ``emitter``."""
    if isinstance(op, ReluOp):
        return [f"    tbn_rt_relu({dst}, {_numel(op.out_shape)}u);"]
    if isinstance(op, AffineOp):
        scale = emitter.floats(base + "_scale", op.scale.float(), op.name)
        shift = emitter.floats(base + "_shift", op.shift.float(), op.name)
        spatial = _numel(op.out_shape[1:])
        return [f"    tbn_rt_affine({dst}, {op.out_shape[0]}u, {spatial}u, {scale}, {shift});"]
    if isinstance(op, CombineOp):
        alpha = emitter.floats(base + "_alpha", op.alpha, op.name, weight=True)
        return [f"    tbn_rt_combine({src}, {_numel(op.out_shape)}u, {op.alpha.numel()}u, {alpha}, {dst});"]
    if isinstance(op, PoolOp):
        geom = emitter.geometry(base + "_geom", op.geometry, op.name)
        if op.average:
            return [f"    tbn_rt_avgpool2d({src}, {geom}, {int(op.count_include_pad)}, {dst});"]
        return [f"    tbn_rt_maxpool2d({src}, {geom}, {dst});"]
    assert isinstance(op, WeightedOp)
    if op.tile is not None:
        weights = emitter.halfwords(base + "_tile", op.tile)
        if op.geometry is not None:
            geom = emitter.geometry(base + "_geom", op.geometry, op.name)
            chunk = _scratch_floats(op, nibble_table_rows)[1]
            first = (f"    tbn_rt_conv2d_tile({src}, {geom}, {weights}, {column_groups(op.geometry)}u, {chunk}u, "
                     f"scratch, {dst});")
        else:
            kind, chunk = table_kind(op, nibble_table_rows), _scratch_floats(op, nibble_table_rows)[1]
            first = (f"    tbn_rt_linear_tile({src}, {op.in_shape[0]}u, {op.rows}u, {weights}, {kind}, {chunk}u, "
                     f"scratch, {dst});")
    else:
        weights = emitter.floats(base + "_weight", op.weight, op.name, weight=True)
        if op.geometry is not None:
            geom = emitter.geometry(base + "_geom", op.geometry, op.name)
            first = f"    tbn_rt_conv2d_f32({src}, {geom}, {weights}, {dst});"
        else:
            first = f"    tbn_rt_linear_f32({src}, {op.in_shape[0]}u, {op.rows}u, {weights}, {dst});"
    if not op.copies_step:
        return [first]
    scale = "NULL" if op.scale is None else emitter.floats(base + "_scale", op.scale, op.name, op.tile is not None)
    bias = "NULL" if op.bias is None else emitter.floats(base + "_bias", op.bias, op.name)
    spatial, per_channel = _numel(op.out_shape[1:]), int(op.scale_per_channel)
    return [first, f"    tbn_rt_copies({dst}, {op.rows}u, {spatial}u, {op.p}u, {scale}, {per_channel}, {bias}, "
                   f"{int(op.relu)});"]
