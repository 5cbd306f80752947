"""Shared plumbing of the quality scripts: model size accounting, result files, docs/results.md.

Every quality script measures its variants, prints its table and calls :func:`publish`, which
stores the rows in ``docs/results/<task>.json`` and regenerates ``docs/results.md`` and the
plots from all stored tasks, so the document holds exactly what the scripts printed.
A ``--quick`` run publishes under ``--out`` (a scratch folder) instead of docs/.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_model
from torch import nn

from hf_tbn import tbn_layers
from hf_tbn.report import summarize

if TYPE_CHECKING:
    from hf_tbn.distill import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@dataclass
class Row:
    """One variant of one task."""

    variant: str
    metrics: dict[str, float]
    bits_converted: float
    bits_model: float
    checkpoint_bytes: int
    train_seconds: float
    converted_layers: dict[str, int] = field(default_factory=dict)


@dataclass
class Task:
    """A task's results: what was measured, how, and each variant's row."""

    name: str
    title: str
    metric: str  # the metric plotted against bits per weight (or against ``x_metric``)
    higher_is_better: bool
    budget: dict[str, object]
    rows: list[Row]
    notes: str = ""
    command: str = ""  # the script's options in the run that measured the rows
    x_metric: str = ""  # set: a curve of ``metric`` against this metric of the rows, one line per variant

    @property
    def x_label(self) -> str:
        """What the plot's x axis shows."""
        return self.x_metric or "bits per weight (converted layers)"


def quality_parser(doc: str, several_seeds: bool = False) -> argparse.ArgumentParser:
    """The options every quality script takes: ``--quick`` (CI smoke run), ``--out``, ``--seed``, and with
    ``several_seeds`` ``--seeds`` (a list, read by :func:`seeds_of`): a script that trains once has no
    ``--seeds`` to ignore."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget (CI smoke run)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where results.md and results/ go")
    parser.add_argument("--seed", type=int, default=0)
    if several_seeds:
        parser.add_argument("--seeds", type=seed_list, help="comma-separated seeds (default: --seed)")
    return parser


@functools.cache
def trainer_output_dir() -> str:
    """A scratch ``output_dir`` for the scripts' Trainers, which save nothing: removed at exit, so that no run
    leaves an empty folder under ``--out`` (docs/)."""
    directory = tempfile.TemporaryDirectory(prefix="hf-tbn-trainer-")
    atexit.register(directory.cleanup)
    return directory.name


def int_list(text: str, what: str, example: str, minimum: int | None = None) -> list[int]:
    """Comma-separated integers (each at least ``minimum``), or an argparse error naming ``what``."""
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        values = []
    if not values or (minimum is not None and min(values) < minimum):
        bound = "" if minimum is None else f" of at least {minimum}"
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected comma-separated integers{bound}, e.g. {example}")
    return values


def seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated integers."""
    return int_list(text, "seeds", "0,1,2")


def seeds_of(args: argparse.Namespace) -> list[int]:
    """``--seeds``, else ``[--seed]``."""
    return args.seeds or [args.seed]


def add_layer_options(parser: argparse.ArgumentParser) -> None:
    """``--alpha-param`` and ``--tile-layout``: the TBNConfig.alpha_param and tile_layout of every TBN variant."""
    from hf_tbn.layers import ALPHA_PARAMS
    from hf_tbn.tiling import TILE_LAYOUTS

    parser.add_argument("--alpha-param", choices=ALPHA_PARAMS, default="latent", help="TBNConfig.alpha_param")
    parser.add_argument("--tile-layout", choices=TILE_LAYOUTS, default="output", help="TBNConfig.tile_layout")


def layer_options(args: argparse.Namespace) -> dict[str, str]:
    """The TBNConfig fields :func:`add_layer_options` sets, for the config and the budget."""
    return {"alpha_param": args.alpha_param, "tile_layout": args.tile_layout}


def learning_rates(text: str) -> dict[str, float]:
    """``--lr``: the learning rate of every variant (``1e-3``), optionally followed by rates for some
    variants (``1e-3,4=3e-3,fp=2.5e-4``: each variant at its own rate, chosen with ``--validation``).
    Returns ``{"": default, variant: rate, ...}``."""
    rates: dict[str, float] = {}
    for item in text.split(","):
        variant, _, value = item.rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0
        if rate <= 0 or variant in rates:
            raise argparse.ArgumentTypeError(f"--lr item {item!r} in {text!r}: expected one positive LR, then "
                                             "VARIANT=LR once per variant, e.g. 1e-3,4=3e-3")
        rates[variant] = rate
    if "" not in rates:
        raise argparse.ArgumentTypeError(f"--lr {text!r}: start with the rate of the other variants, e.g. 1e-3,4=3e-3")
    return rates


def add_lr_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--lr`` parsed by :func:`learning_rates`."""
    parser.add_argument("--lr", type=learning_rates, default=learning_rates(default),
                        help=f"learning rate of every variant, then VARIANT=LR for variants at their own rate "
                             f"(default {default}; e.g. 1e-3,4=3e-3)")


def variant_rates(parser: argparse.ArgumentParser, lr: dict[str, float], variants: list[str]) -> dict[str, float]:
    """Each variant's rate from ``--lr``; a rate for a variant that does not run is refused."""
    if unknown := sorted(set(lr) - {""} - set(variants)):
        parser.error(f"--lr sets a rate for {', '.join(unknown)}, which --variants does not run")
    return {v: lr.get(v, lr[""]) for v in variants}


def budget_rates(rates: dict[str, float]) -> float | dict[str, float]:
    """The budget's ``lr``: one number when every variant shares it, else the rate of each."""
    return next(iter(rates.values())) if len(set(rates.values())) == 1 else rates


def add_variant_options(parser: argparse.ArgumentParser, default: str) -> None:
    """The options of the Trainer-based scripts: ``--variants`` (see :func:`parse_variant`), ``--validation``,
    the warm-up fraction, the distillation weights and ``--alpha-param``."""
    from hf_tbn.distill import OPTION_FIELDS, DistillConfig
    from hf_tbn.qat import DEFAULT_WARMUP

    add_layer_options(parser)
    parser.add_argument("--variants", help=f"comma-separated (default {default})")
    parser.add_argument("--validation", action="store_true", help="score on a validation split of the training data")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, help="warm-up fraction of +warmup variants")
    for field_name in OPTION_FIELDS:
        default = getattr(DistillConfig, field_name)
        kind = {"action": "store_true"} if isinstance(default, bool) else {"type": float, "default": default}
        parser.add_argument(f"--{field_name.replace('_', '-')}", **kind)
    parser.add_argument("--hidden-layers", type=lambda v: tuple(int(i) for i in v.split(",")),
                        help="comma-separated indices into hidden_states for --hidden-weight (default: every layer)")


@dataclass
class VariantPlan:
    """What the options of :func:`add_variant_options` ask for."""

    names: list[str]  # as given, e.g. "8+warmup"
    parsed: list[tuple[int | None, bool, bool]]  # parse_variant of each
    distill: DistillConfig  # every field from its option

    @property
    def distills(self) -> bool:
        """Whether a variant learns from a teacher (+distill)."""
        return any(distill for _, _, distill in self.parsed)


def variant_plan(args: argparse.Namespace, default: str, quick_default: str, fp_teacher: bool) -> VariantPlan:
    """The variants ``--variants`` (else the default, or the quick one) names, parsed, with their distillation
    settings; ``fp_teacher``: +distill variants learn from the fp variant's model, which must come first."""
    from hf_tbn.distill import OPTION_FIELDS, DistillConfig

    names = [v for v in (args.variants or (quick_default if args.quick else default)).split(",") if v]
    parsed = [parse_variant(v) for v in names]
    if fp_teacher and any(distill for _, _, distill in parsed) and names[0] != "fp":
        raise ValueError("a +distill variant needs the fp variant first (its teacher)")
    distill = DistillConfig(**{name: getattr(args, name) for name in OPTION_FIELDS}, hidden_layers=args.hidden_layers)
    return VariantPlan(names, parsed, distill)


def parse_variant(variant: str) -> tuple[int | None, bool, bool]:
    """A variant of the Trainer-based scripts: ``fp`` or ``P`` (TBN p = P), then optionally ``+warmup``
    (hf_tbn.qat's dense-to-tiled warm-up) and ``+distill`` (hf_tbn.distill).

    ``"8+warmup+distill"`` -> (8, True, True); ``"fp"`` -> (None, False, False).
    """
    base, *options = variant.split("+")
    unknown = set(options) - {"warmup", "distill"}
    if unknown or (base != "fp" and not base.isdigit()) or (base == "fp" and options):
        raise ValueError(f"variant {variant!r}: expected fp or P[+warmup][+distill], e.g. 8+warmup")
    return (None if base == "fp" else int(base)), "warmup" in options, "distill" in options


def train_variant(variant: tuple[int | None, bool, bool], warmup: float, distill: DistillConfig,
                  teacher: nn.Module | None = None, **trainer_args: Any) -> float:
    """Train a parsed variant (:func:`parse_variant`) in place; returns the training seconds.

    +distill: ``DistillationTrainer`` with ``teacher`` (None: the checkpoint before conversion), else
    ``TBNTrainer``; +warmup: the warm-up fraction ``warmup``, otherwise none (plain QAT, whatever the
    model's ``TBNConfig.warmup`` says).
    """
    from hf_tbn.distill import DistillationTrainer
    from hf_tbn.qat import TBNTrainer

    _, with_warmup, use_teacher = variant
    trainer_args["warmup"] = warmup if with_warmup else 0.0
    start = time.time()
    if use_teacher:
        DistillationTrainer(**trainer_args, teacher=teacher, distill=distill).train()
    else:
        TBNTrainer(**trainer_args).train()
    return time.time() - start


def measure(p: int | str | None, model: nn.Module, metrics: dict[str, float], seconds: float) -> Row:
    """The row of variant ``p`` (None: full precision; a string: the variant's label) for a trained model
    in the form it is saved."""
    bits_converted, bits_model, ckpt = size_report(model)
    factors = {name: layer.compression_factor for name, layer in tbn_layers(model)}
    label = p if isinstance(p, str) else "fp" if p is None else f"p={p}"
    return Row(label, metrics, bits_converted, bits_model, ckpt, seconds, factors)


def over_seeds(rows: Sequence[Row], metric: str, higher_is_better: bool) -> Row:
    """One row for the same variant run with several seeds: ``metric`` becomes the mean, with its
    standard deviation and the worst seed beside it; the other metrics and the train seconds are means."""
    values = [r.metrics[metric] for r in rows]
    metrics = {name: statistics.fmean(r.metrics[name] for r in rows) for name in rows[0].metrics}
    metrics.update({f"{metric} std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "worst seed": min(values) if higher_is_better else max(values), "seeds": float(len(values))})
    first = rows[0]
    return Row(first.variant, metrics, first.bits_converted, first.bits_model, first.checkpoint_bytes,
               statistics.fmean(r.train_seconds for r in rows), first.converted_layers)


def size_report(model: nn.Module) -> tuple[float, float, int]:
    """Bits per weight over the converted layers and over the whole model, and checkpoint bytes.

    The model is measured in the form it is saved (:func:`hf_tbn.report.summarize`): TBN layers
    packed (tile + scales), every other float parameter and buffer at its own dtype, tied weights
    once. A model without TBN layers counts 32 bits for its converted layers (none).
    """
    s = summarize(model)
    bits_converted = s.bits_per_weight if s.layers else 32.0
    bits_model = 8 * (s.converted_bytes + s.other_float_bytes) / (s.converted_weights + s.other_float_elements)
    return bits_converted, bits_model, checkpoint_bytes(model)


def checkpoint_bytes(model: nn.Module) -> int:
    """Size of the model's state dict saved as safetensors (packed TBN layers stay packed, tied weights once)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def format_table(task: Task) -> str:
    """The task's table as markdown (also what the script prints)."""
    metric_names = list(dict.fromkeys(name for r in task.rows for name in r.metrics))  # "-": a row without it
    head = ["variant", *metric_names, "bits/weight (converted)", "bits/weight (model)", "checkpoint KB", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in task.rows:
        values = (f"{r.metrics[m]:.4g}" if m in r.metrics else "-" for m in metric_names)
        cells = [r.variant, *values, f"{r.bits_converted:.3f}", f"{r.bits_model:.3f}",
                 f"{r.checkpoint_bytes / 1024:.1f}", f"{r.train_seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def publish(task: Task, out: Path = DOCS, show: bool = True) -> None:
    """Store the task's rows and regenerate results.md and the plots under ``out``; ``show``: print the table.

    Scripts publish after every variant (a stopped run keeps what it measured) and show the table once, at the end.
    """
    task.command = task.command or measured_options(sys.argv[1:])
    if show:
        print(f"\n{task.title}\nbudget: {json.dumps(task.budget)}\n{format_table(task)}")
    store = out / "results"
    store.mkdir(parents=True, exist_ok=True)
    (store / f"{task.name}.json").write_text(json.dumps(asdict(task), indent=1) + "\n")
    tasks = [load(p) for p in sorted(store.glob("*.json"))]
    for t in tasks:
        plot(t, store / f"{t.name}.png")
    (out / "results.md").write_text(render(tasks))
    print(f"wrote {store / (task.name + '.json')} and {out / 'results.md'}")


def measured_options(argv: Sequence[str]) -> str:
    """The command's options without ``--out``: where the tables were written is not part of what was measured,
    so a run into a scratch folder records the same command as one into docs/."""
    kept, after_out = [], False
    for arg in argv:
        if not after_out and arg != "--out" and not arg.startswith("--out="):
            kept.append(arg)
        after_out = arg == "--out"
    return shlex.join(kept)


def load(path: Path) -> Task:
    data = json.loads(path.read_text())
    data["rows"] = [Row(**r) for r in data["rows"]]
    return Task(**data)


def render(tasks: Sequence[Task]) -> str:
    """docs/results.md: one section per task, generated (never edited by hand)."""
    parts = ["# Quality results\n",
             "Generated by the scripts in `scripts/quality_*.py` (each prints the same table); do not edit.\n",
             "Bits per weight count packed tiles (whole bytes) plus fp32 scales; 'model' adds every other",
             "parameter and buffer at its stored dtype. Checkpoint: the state dict as safetensors.\n"]
    for t in tasks:
        command = " ".join(filter(None, [f".venv/bin/python scripts/quality_{t.name.split('-')[0]}.py", t.command]))
        parts += [f"## {t.title}\n", f"Command: `{command}`  ",
                  f"Budget: `{json.dumps(t.budget)}`\n", format_table(t), "",
                  f"![{t.metric} against {t.x_label}](results/{t.name}.png)\n"]
        if t.notes:
            parts += [t.notes, ""]
    return "\n".join(parts) + "\n"


def plot(task: Task, path: Path) -> None:
    """The task's metric against bits per weight of the converted layers (log scale), or with ``x_metric``
    a line per variant through its rows against that metric (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if task.x_metric:
        for variant in dict.fromkeys(r.variant for r in task.rows):
            points = sorted((r.metrics[task.x_metric], r.metrics[task.metric]) for r in task.rows
                            if r.variant == variant)
            ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        for r in task.rows:
            x = r.bits_converted
            ax.scatter([x], [r.metrics[task.metric]], label=r.variant)
            ax.annotate(r.variant, (x, r.metrics[task.metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(task.x_label)
    ax.set_ylabel(task.metric)
    ax.set_title(task.title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

