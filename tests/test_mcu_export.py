"""The microcontroller exporter: generated C on the host (gcc) and on an emulated Cortex-M4.

Needs gcc, the Arm toolchain and qemu-system-arm and the Fashion-MNIST package (installed by
scripts/setup.sh); a missing tool fails with the packages to install, it is never skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hf_tbn import TBNConv2d, TBNLinear, mcu_export, tiling
from hf_tbn.cli import main as cli_main
from hf_tbn.demos import fashion_mnist as demo
from hf_tbn.mcu_export import codegen

tc = mcu_export.toolchain
export_model, plan_export = mcu_export.export_model, mcu_export.plan_export
rel_err = tc.rel_err

HOST_IMAGES = 500
BOARD_IMAGES = 100
MAX_REL_ERR = 1e-4


@pytest.fixture(scope="module")
def fashion() -> dict[str, torch.Tensor]:
    x, y = demo.load_fashion_mnist("train")
    xt, yt = demo.load_fashion_mnist("test")
    return {"x": x[:12000], "y": y[:12000], "xt": xt[:HOST_IMAGES], "yt": yt[:HOST_IMAGES]}


@pytest.fixture(scope="module")
def trained(fashion: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The paper's MLP (fc1 p=4, fc2 p=1) and the small CNN, trained briefly, in latent form."""
    models = {}
    for name, build in (("mlp", lambda: demo.mlp(4, 1)), ("cnn", lambda: demo.cnn(1, 4, 1))):
        torch.manual_seed(0)
        models[name] = demo.train(build(), fashion["x"], fashion["y"], epochs=1, seed=0)
    return models


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_host_and_board_match_pytorch(name: str, trained: dict[str, nn.Module], fashion: dict[str, torch.Tensor],
                                      tmp_path: Path) -> None:
    model = trained[name]
    images = fashion["xt"]
    ref = demo.predict(model, images)
    assert (ref.argmax(1) == fashion["yt"]).float().mean() > 0.6, "the quickly trained model should have learnt"
    export = export_model(model, (1, 28, 28), tmp_path)

    host = tc.run_host(export, tc.build_host(export), images)
    assert host.shape == ref.shape
    assert rel_err(host, ref) <= MAX_REL_ERR
    assert torch.equal(host.argmax(1), ref.argmax(1))

    board = tc.run_board(export, tc.build_board(export), images[:BOARD_IMAGES])
    assert torch.equal(board.outputs.argmax(1), ref[:BOARD_IMAGES].argmax(1))
    assert rel_err(board.outputs, ref[:BOARD_IMAGES]) <= MAX_REL_ERR
    assert board.instructions_per_inference > 0


def test_tiled_layer_uses_compute_reuse_and_tiling_bits(trained: dict[str, nn.Module]) -> None:
    model = trained["mlp"]
    plan = plan_export(model, (1, 28, 28))
    fc1 = plan.ops[0]
    assert (fc1.rows, fc1.p) == (32, 4)  # 128 outputs: the 32 tile rows once, 4 scaled copies
    assert "tbn_rt_linear_tile(in, 784u, 32u, tbn_model_l0_fc1_tile, TBN_RT_NIBBLE," in plan.generated.source
    assert "tbn_rt_copies(buf0, 32u, 1u, 4u," in plan.generated.source
    expected = tiling.pack_bits(tiling.aggregate_sign(model.fc1.weight.detach(), 4))
    assert torch.equal(fc1.tile, expected)  # 784 % 16 == 0: the rows need no padding
    first = ", ".join(f"0x{lo | hi << 8:04x}" for lo, hi in expected[:24].view(-1, 2).tolist())
    assert first in plan.generated.source
    assert plan.generated.weight_bytes == model.fc1.storage_bytes() + model.fc2.storage_bytes()


def test_footprint_counts_the_models_constants_and_arena(tmp_path: Path) -> None:
    export = export_model(demo.mlp(4, 1), (1, 28, 28), tmp_path)
    fp = tc.footprint(export)
    assert fp.rodata == export.plan.flash_bytes == 3316
    assert fp.bss == export.plan.ram_bytes and fp.data == 0
    assert 0 < fp.text < 4096  # tbn_model_run and the kernels it calls, nothing else


def test_latent_model_is_not_modified_and_exports_like_packed(trained: dict[str, nn.Module]) -> None:
    model = trained["mlp"]
    before = model.fc1.weight.detach().clone()
    latent_source = plan_export(model, (784,)).generated.source
    assert model.fc1.form == "latent" and torch.equal(model.fc1.weight, before)
    packed = demo.mlp(4, 1)
    packed.load_state_dict(model.state_dict())
    for layer in (packed.fc1, packed.fc2):
        layer.pack()
    assert plan_export(packed, (784,)).generated.source == latent_source


def _geometry_model() -> nn.Sequential:
    """Every supported layer type and option the runtime implements, with random statistics."""
    model = nn.Sequential(
        TBNConv2d(3, 8, 3, stride=2, padding=2, dilation=2, compression_factor=2),  # BN folded per channel
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 6, (3, 2), stride=(1, 2), padding=(1, 0)),
        nn.BatchNorm2d(6),  # folded into a float weight
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nn.BatchNorm2d(6),  # after a pool: a standalone affine step
        nn.ReLU(),  # after it: a standalone ReLU step
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Dropout(0.5),
        TBNLinear(12, 12, compression_factor=3),
        nn.BatchNorm1d(12),
        nn.ReLU(),  # folded BatchNorm, then ReLU fused into the copy step
        nn.Linear(12, 5),
        nn.ReLU(),
        nn.BatchNorm1d(5),  # after a fused ReLU: a standalone affine step, not folded
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def test_every_layer_option_matches_on_host(tmp_path: Path) -> None:
    model = _geometry_model()
    x = torch.randn(200, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    export = export_model(model, (3, 12, 10), tmp_path)
    kinds = [op.kind for op in export.plan.ops]
    assert kinds == ["TBNConv2d(p=2)+BatchNorm+ReLU", "MaxPool2d", "Conv2d+BatchNorm", "AvgPool2d", "BatchNorm2d",
                     "ReLU", "AvgPool2d", "TBNLinear(p=3)+BatchNorm+ReLU", "Linear+ReLU", "BatchNorm1d"]
    host = tc.run_host(export, tc.build_host(export), x)
    assert rel_err(host, ref) <= MAX_REL_ERR
    assert torch.equal(host.argmax(1), ref.argmax(1))


def test_input_tile_layout_matches_on_host_and_board(tmp_path: Path) -> None:
    """Input-layout layers: the alpha-weighted sum of the input blocks, then the (out, in/p) tile as a p = 1 layer,
    BatchNorm folded into it; the combined input is a fraction 1/p of the layer's input."""
    model = nn.Sequential(
        TBNConv2d(8, 6, 3, padding=1, compression_factor=4, tile_layout="input"), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), TBNLinear(6 * 5 * 4, 10, compression_factor=8, tile_layout="input"),
    )
    torch.manual_seed(3)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    model.eval()
    x = torch.randn(50, 8, 5, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
    export = export_model(model, (8, 5, 4), tmp_path)
    ops = export.plan.ops
    assert [(op.kind, op.in_shape, op.out_shape) for op in ops[:2]] == [
        ("combine(p=4)", (8, 5, 4), (2, 5, 4)), ("TBNConv2d(p=4, input layout)+BatchNorm+ReLU", (2, 5, 4), (6, 5, 4))]
    assert (ops[1].rows, ops[1].p) == (6, 1) and ops[-1].in_shape == (15,)
    assert "tbn_rt_combine(in, 40u, 4u," in export.plan.generated.source
    host = tc.run_host(export, tc.build_host(export), x)
    assert rel_err(host, ref) <= MAX_REL_ERR
    board = tc.run_board(export, tc.build_board(export), x[:10])
    assert rel_err(board.outputs, ref[:10]) <= MAX_REL_ERR


def test_any_module_names_give_valid_c(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("1 fc/*é*/", TBNLinear(6, 4, compression_factor=2))
    model.add_module("int??/", nn.ReLU())
    model.add_module("fc-2 ü", TBNLinear(4, 2, compression_factor=1))
    export = export_model(model, (6,), tmp_path, prefix="my_model")
    x = torch.randn(8, 6)
    host = tc.run_host(export, tc.build_host(export), x)
    assert rel_err(host, model(x).detach()) <= MAX_REL_ERR


def test_over_budget_is_refused_with_sizes(tmp_path: Path) -> None:
    model = demo.mlp(4, 1)
    plan = plan_export(model, (1, 28, 28))
    assert plan.flash_bytes == 3136 + 16 + 160 + 4
    with pytest.raises(ValueError, match=rf"flash: needs {plan.flash_bytes} bytes .*--flash-kb 2"):
        export_model(model, (1, 28, 28), tmp_path / "a", flash_kb=2)
    with pytest.raises(ValueError, match=rf"RAM: needs {plan.ram_bytes} bytes .*--ram-kb 1"):
        export_model(model, (1, 28, 28), tmp_path / "b", ram_kb=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    export_model(model, (1, 28, 28), tmp_path / "c", flash_kb=4, ram_kb=plan.ram_bytes / 1024)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Flatten(), TBNLinear(4, 2, compression_factor=2), nn.GELU()), r"^2: GELU is not supported"),
        (nn.Sequential(TBNLinear(4, 2, compression_factor=1), nn.LayerNorm(2)), r"^1: LayerNorm is not supported"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), r"^0: groups=2 is not supported"),
        (nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), r"^0: ceil_mode=True"),
    ],
)
def test_unsupported_modules_are_named(model: nn.Module, match: str) -> None:
    shape = (2, 6, 6) if isinstance(model[0], (nn.Conv2d, nn.MaxPool2d)) else (4,)
    with pytest.raises(ValueError, match=match):
        plan_export(model, shape)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = TBNLinear(4, 4, compression_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


def test_non_sequential_forward_is_refused() -> None:
    with pytest.raises(ValueError, match="_Residual: its forward is not the chain of its layers"):
        plan_export(_Residual(), (4,))


def test_missing_tool_names_the_packages() -> None:
    with pytest.raises(RuntimeError, match="gcc-arm-none-eabi .*qemu-system-arm"):
        tc.require("arm-none-eabi-no-such-tool")


def test_cli_exports_and_refuses_over_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(demo.mlp(4, 1), path)
    out = tmp_path / "c"
    assert cli_main(["export-mcu", str(path), "--input-shape", "1,28,28", "--out", str(out), "--name", "fm"]) == 0
    assert (out / "fm.h").exists() and (out / "fm.c").exists() and (out / "tbn_runtime.c").exists()
    assert "weights 3316 B" in capsys.readouterr().out
    code = cli_main(["export-mcu", str(path), "--input-shape", "784", "--out", str(tmp_path / "d"), "--flash-kb", "1"])
    assert code == 1
    assert "flash: needs 3316 bytes" in capsys.readouterr().err


def _linear_tile_models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Tiled linear layers whose row lengths need zero-padded tables, and one of several table chunks."""
    torch.manual_seed(3)
    return [
        ("linear 37->12 p=3", nn.Sequential(TBNLinear(37, 12, bias=True, compression_factor=3)), (37,)),
        ("linear 1000->8 p=1", nn.Sequential(TBNLinear(1000, 8, bias=False, compression_factor=1)), (1000,)),
        ("linear 21->2 p=1", nn.Sequential(TBNLinear(21, 2, bias=True, compression_factor=1)), (21,)),
    ]


@pytest.mark.parametrize("nibble_table_rows", [1, 10**6], ids=["nibble", "pair"])
def test_both_table_kinds_match_on_host(nibble_table_rows: int, tmp_path: Path) -> None:
    for index, (name, model, shape) in enumerate(_linear_tile_models()):
        model.eval()
        x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            ref = model(x).flatten(1)
        export = export_model(model, shape, tmp_path / str(index), nibble_table_rows=nibble_table_rows)
        kind = "TBN_RT_NIBBLE" if nibble_table_rows == 1 else "TBN_RT_PAIR"
        assert kind in export.plan.generated.source, name
        host = tc.run_host(export, tc.build_host(export), x)
        assert rel_err(host, ref) <= MAX_REL_ERR, name
        assert torch.equal(host.argmax(1), ref.argmax(1)), name


def _conv_tile_models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Tiled convolutions in every shape their column tables take: windows of at most one halfword (a row's
    offsets kept along the output row), columns of a part of a halfword (one run per window with a nibble
    tail) or of whole halfwords (padding columns skipped), and dilation."""
    torch.manual_seed(4)
    return [
        ("1->6 p=2, a column of one nibble", TBNConv2d(1, 6, 3, padding=1, compression_factor=2), (1, 7, 6)),
        ("2->4 p=1 (1, 2) kernel, a window of two nibbles", TBNConv2d(2, 4, (1, 2), compression_factor=1), (2, 5, 6)),
        ("1->4 p=2 (3, 4) kernel strided, a window of four nibbles",
         TBNConv2d(1, 4, (3, 4), stride=2, padding=(1, 2), compression_factor=2), (1, 7, 9)),
        ("3->8 p=2 strided, dilated (columns rounded to halfwords)",
         TBNConv2d(3, 8, 3, stride=2, padding=2, dilation=2, compression_factor=2), (3, 9, 7)),
        ("5->6 p=1 (2, 3) kernel, 3 nibbles a column", TBNConv2d(5, 6, (2, 3), padding=(1, 0), compression_factor=1),
         (5, 6, 6)),
        ("16->8 p=2 strided, dilated", TBNConv2d(16, 8, 3, stride=2, padding=2, dilation=2, compression_factor=2),
         (16, 9, 7)),
        ("32->6 p=1 (2, 3) kernel", TBNConv2d(32, 6, (2, 3), stride=(1, 2), padding=(1, 0), compression_factor=1),
         (32, 5, 6)),
        ("16->4 p=2 windows wholly in the padding", TBNConv2d(16, 4, 2, padding=2, compression_factor=2), (16, 3, 3)),
        ("64->8 p=4 input layout (16 combined channels)",
         TBNConv2d(64, 8, 3, padding=1, compression_factor=4, tile_layout="input"), (64, 6, 5)),
    ]


@pytest.mark.parametrize("table_floats", [codegen.CONV_TABLE_FLOATS, 1], ids=["rows", "one-window"])
def test_tiled_convolutions_match_on_host_and_board(table_floats: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default table budget every row's windows share one set of column tables; with none, each
    window builds its own (the chunk boundaries of a wide input)."""
    monkeypatch.setattr(codegen, "CONV_TABLE_FLOATS", table_floats)
    for index, (name, conv, shape) in enumerate(_conv_tile_models()):
        c = shape[0]  # two dense layers first, so the tiled one writes a buffer holding older activations
        model = nn.Sequential(nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), conv).eval()
        x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            ref = model(x).flatten(1)
        export = export_model(model, shape, tmp_path / str(index))
        host = tc.run_host(export, tc.build_host(export), x)
        board = tc.run_board(export, tc.build_board(export), x)
        assert rel_err(host, ref) <= MAX_REL_ERR, name
        assert rel_err(board.outputs, ref) <= MAX_REL_ERR, name


def test_row_padding_keeps_the_tiling_bit_order() -> None:
    model = nn.Sequential(TBNLinear(21, 4, compression_factor=2))
    fc = plan_export(model, (21,)).ops[0]
    rows = tiling.unpack_bits(fc.tile, fc.tile.numel() * 8).view(2, 32)  # 21 bits padded to 32 per row
    expected = model[0].tile_values().view(2, 21)
    assert torch.equal(rows[:, :21], expected)


@pytest.mark.parametrize("name", ["tbn_runtime", "tbn_harness", "tbn_startup", "TBN_Board", "tbn_rt_x", "", "9fm",
                                  "my-model", "int", "__x", "_Model", "a" * 49])
def test_bad_or_reserved_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model name"):
        export_model(demo.mlp(4, 1), (784,), tmp_path / "out", prefix=name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_budgets_are_refused(budget: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--flash-kb must be a finite number"):
        export_model(demo.mlp(4, 1), (784,), tmp_path / "a", flash_kb=budget)
    with pytest.raises(ValueError, match="--ram-kb must be a finite number"):
        export_model(demo.mlp(4, 1), (784,), tmp_path / "b", ram_kb=budget)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("flag", ["--flash-kb", "--ram-kb"])
@pytest.mark.parametrize("value", ["nan", "-2", "inf"])
def test_cli_refuses_bad_budgets(flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(demo.mlp(4, 1), path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export-mcu", str(path), "--input-shape", "784", "--out", str(tmp_path / "c"), flag, value])
    assert exit_info.value.code == 2
    assert "finite number of KiB" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_alpha_is_refused_naming_the_layer(value: float) -> None:
    model = demo.mlp(4, 1)
    model.fc1.pack()
    model.fc1.alpha[2] = value
    with pytest.raises(ValueError, match=r"^fc1: alpha holds non-finite values"):
        plan_export(model, (784,))


def test_cli_wrong_input_shape_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(demo.mlp(4, 1), path)
    assert cli_main(["export-mcu", str(path), "--input-shape", "1,28", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input shape (1, 28) does not fit" in err
    assert not (tmp_path / "c").exists()


class _Payload:
    """Unpickling this touches a file: what a hostile model file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_cli_loads_with_an_allow_list_and_trusts_only_on_request(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": _Payload(marker)}, hostile)
    args = ["export-mcu", str(hostile), "--input-shape", "4", "--out", str(tmp_path / "c")]
    assert cli_main(args) == 1
    assert "--trust-pickle" in capsys.readouterr().err and not marker.exists()

    custom = tmp_path / "residual.pt"
    torch.save(_Residual(), custom)  # a class outside the allow-list
    args = ["export-mcu", str(custom), "--input-shape", "4", "--out", str(tmp_path / "d")]
    assert cli_main(args) == 1
    assert "refused by the restricted loader" in capsys.readouterr().err
    assert cli_main([*args, "--trust-pickle"]) == 1  # loaded, then refused by the exporter itself
    assert "its forward is not the chain" in capsys.readouterr().err

    for model in (demo.mlp(4, 1), demo.cnn(1, 4, 1), demo.mlp(None, None)):
        path = tmp_path / "ok.pt"
        torch.save(model, path)
        out = tmp_path / "ok"
        assert cli_main(["export-mcu", str(path), "--input-shape", "1,28,28", "--out", str(out), "--name", "m"]) == 0
        assert (out / "m.c").exists()
