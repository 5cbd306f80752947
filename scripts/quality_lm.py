"""Causal language modelling: SmolLM2-135M on the Debian ``fortunes`` text, fp vs binary vs TBN.

Held-out perplexity of the pretrained full-precision model, of each TBN variant right after
conversion (no training) and after quantization-aware fine-tuning with Trainer; the
full-precision model gets the same fine-tuning budget. Fortunes are shuffled with the seed and
5% are held out; both splits are cut into blocks of ``--block`` tokens (training blocks of
``--train-block`` with it: a budget shape of more, shorter steps, scored on the same blocks). Variants as in
quality_bbc.py: ``fp``, ``P``, ``P+warmup``, ``P+distill`` (teacher: the pretrained checkpoint,
hf_tbn.distill.load_teacher's default, or with ``--teacher fp`` the fp variant fine-tuned first,
as BitDistill does). The perplexity is also measured at the fractions
``--eval-at`` of the run (learning rate not yet annealed). ``--steps 60,120,240`` runs every variant once per
budget, each with its whole schedule: a perplexity-against-tokens curve (task ``lm-tokens``), the teacher of
each budget the fp variant of that budget. ``--validation`` scores on blocks
taken from the end of the training split instead of the held-out fortunes. ``--seeds 0,1,2`` repeats
everything per seed (its own split and order) and reports the mean, std and worst seed; a variant beside the
plain ``P`` of the same p (``P+distill``) also gets how many times lower its perplexity is than that plain row's.

    .venv/bin/python scripts/quality_lm.py                         # full budget, writes docs/
    .venv/bin/python scripts/quality_lm.py --quick --out /tmp/q    # CI smoke run
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from results import (
    Task,
    add_lr_option,
    add_variant_options,
    budget_rates,
    int_list,
    layer_options,
    measure,
    over_seeds,
    publish,
    quality_parser,
    seeds_of,
    train_variant,
    trainer_output_dir,
    variant_plan,
    variant_rates,
)
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback, TrainingArguments

from hf_tbn import TBNConfig, pack_model
from hf_tbn.demos.models import smollm2_dir
from hf_tbn.distill import DistillConfig
from hf_tbn.qat import set_blend

FORTUNES = Path("/usr/share/games/fortunes")
VARIANTS = "fp,1,2,4,8,4+distill,8+distill"
QUICK_VARIANTS = "fp,4+distill"
NOTES = ("'before' is the model as loaded (for TBN: right after conversion, no training){part_way}. Converted: every "
         "decoder Linear; the tied embeddings / lm_head stay full precision. +warmup: hf_tbn.qat.QuantizationWarmup; "
         "+distill: hf_tbn.distill.DistillationTrainer, teacher = {teacher} (docs/distillation.md). "
         "'x lower than plain': the same p's plain row over this row, a mean of per-seed ratios.")
CURVE_NOTES = (" One run per budget ('tokens': steps x blocks x tokens per block), each with its whole learning-rate "
               "schedule; the teacher of a +distill row is the fp row of its own budget.")
PART_WAY_NOTE = "; 'after N tokens': the same run scored part-way (its learning rate not yet annealed)"
METRIC = "perplexity after fine-tuning"
PLAIN_RATIO = "x lower than plain"  # the same p trained plain (no warm-up, no teacher) over this variant
TEACHERS = {"pretrained": "the pretrained checkpoint", "fp": "the fp row's model after its fine-tuning"}


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fortunes(tokenizer: Callable[[str], dict], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token ids of every fortune file (``%``-separated texts, shuffled with ``seed``)."""
    files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix)
    if not files:
        raise FileNotFoundError(f"no fortune files under {FORTUNES}: install the Debian package fortunes")
    texts = [t.strip() for p in files for t in p.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    texts = [t for t in texts if t]
    random.Random(seed).shuffle(texts)
    n_test = len(texts) // 20

    def ids(part: list[str]) -> torch.Tensor:
        return torch.tensor(tokenizer("\n\n".join(part))["input_ids"])

    return ids(texts[n_test:]), ids(texts[:n_test])


def blocks(ids: torch.Tensor, block: int) -> Blocks:
    """``ids`` cut into whole blocks of ``block`` tokens (the tail left out)."""
    return Blocks(ids[: len(ids) // block * block].view(-1, block))


def train_and_scored(tokenizer: Callable[[str], dict], seed: int, block: int, train_block: int, n_eval: int,
                     validation: bool) -> tuple[Blocks, Blocks]:
    """Training blocks of ``train_block`` tokens and ``n_eval`` scored blocks of ``block`` tokens: the first
    held-out ones, or with ``validation`` the last whole blocks of the training text (left out of training)."""
    train_ids, test_ids = fortunes(tokenizer, seed)
    if validation:
        end = len(train_ids) // block * block
        train_ids, test_ids = train_ids[: end - n_eval * block], train_ids[end - n_eval * block : end]
    return blocks(train_ids, train_block), Blocks(blocks(test_ids, block).ids[:n_eval])


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, data: Blocks, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch):
        ids = data.ids[start : start + batch]
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - ids.shape[0]  # predicted tokens
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


class PerplexityAt(TrainerCallback):
    """Held-out perplexity of the plain TBN model (no warm-up blend) after the given optimizer steps.

    The model goes back to training mode; the warm-up sets its blend again at the next step.
    """

    def __init__(self, data: Blocks, steps: list[int]) -> None:
        self.data, self.steps, self.curve = data, set(steps), {}

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:  # noqa: ANN001, ANN003
        if state.global_step in self.steps:
            set_blend(model, 1.0)
            self.curve[state.global_step] = perplexity(model, self.data)
            model.train()


def step_list(text: str) -> list[int]:
    """``--steps``: comma-separated positive step counts, each a budget of its own."""
    return sorted(set(int_list(text, "steps", "60,120", minimum=1)))


def load_variant(model_dir: Path, p: int | None, args: argparse.Namespace) -> LlamaForCausalLM:
    """The checkpoint in full precision (``p`` None) or converted to TBN p with the command's layer options."""
    extra = {} if p is None else {"quantization_config": TBNConfig(compression_factor=p, **layer_options(args))}
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)


def fine_tune(model: LlamaForCausalLM, variant: tuple[int | None, bool, bool], args: argparse.Namespace,
              rate: float, steps: int, seed: int, data: tuple[Blocks, Blocks], checkpoints: list[int],
              distill: DistillConfig, teacher: LlamaForCausalLM | None) -> tuple[float, dict[int, float]]:
    """Fine-tune a variant (results.parse_variant) in place for ``steps`` on ``data``'s training blocks, then pack
    it if TBN; returns the training seconds and its perplexity on ``data``'s scored blocks after each of
    ``checkpoints``' steps."""
    train, test = data
    targs = TrainingArguments(
        output_dir=trainer_output_dir(), max_steps=steps, per_device_train_batch_size=args.batch,
        learning_rate=rate, max_grad_norm=args.max_grad_norm, lr_scheduler_type="cosine", warmup_steps=0.05,
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, data_seed=seed, logging_steps=10,
        disable_tqdm=True,
    )
    part_way = PerplexityAt(test, checkpoints)
    seconds = train_variant(variant, args.warmup, distill, teacher, model=model, args=targs, train_dataset=train,
                            callbacks=[part_way])
    if variant[0] is not None:
        pack_model(model)
    return seconds, part_way.curve


def main() -> None:
    parser = quality_parser(__doc__, several_seeds=True)
    parser.add_argument("--cache", type=Path, default=Path("outputs/smollm2"), help="plain HF copy of SmolLM2")
    parser.add_argument("--steps", type=step_list, help="optimizer steps; several: one run per budget (default 60, "
                                                        "--quick 2)")
    parser.add_argument("--batch", type=int, default=4, help="blocks per step")
    parser.add_argument("--block", type=int, default=128, help="tokens per scored block")
    parser.add_argument("--train-block", type=int, help="tokens per training block (default: --block)")
    add_lr_option(parser, "5e-4")
    parser.add_argument("--teacher", choices=tuple(TEACHERS), default="pretrained",
                        help="+distill teacher: the pretrained checkpoint, or the fp variant after its fine-tuning")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (Trainer's; 0: none)")
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--eval-at", default="0.25,0.5",
                        help="fractions of the run, besides its end, to score at (one budget only)")
    add_variant_options(parser, VARIANTS)
    args = parser.parse_args()
    plan = variant_plan(args, VARIANTS, QUICK_VARIANTS, fp_teacher=args.teacher == "fp")
    variants, distill, seeds = plan.names, plan.distill, seeds_of(args)
    rates = variant_rates(parser, args.lr, variants)
    model_dir = smollm2_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    block = 32 if args.quick else args.block
    train_block = block if args.quick or args.train_block is None else args.train_block
    n_eval = 4 if args.quick else args.eval_blocks
    budgets = args.steps or [2 if args.quick else 60]
    curve = len(budgets) > 1  # one row per variant and budget, no part-way scores
    fractions = [] if curve else [float(f) for f in args.eval_at.split(",") if f]
    split_name = "validation" if args.validation else "held-out"
    budget = {"steps": budgets if curve else budgets[0], "batch_size": args.batch, "block_tokens": block,
              **({"train_block_tokens": train_block} if train_block != block else {}), "lr": budget_rates(rates),
              "scheduler": "cosine",
              **({"max_grad_norm": args.max_grad_norm} if args.max_grad_norm != 1.0 else {}),
              "optimizer": "AdamW", "seeds": seeds, "scored_on": split_name, "warmup": args.warmup,
              **layer_options(args),
              "distill": vars(distill) if plan.distills else None,
              **({"teacher": TEACHERS["fp"]} if args.teacher == "fp" else {})}
    tokens_per_step = args.batch * train_block
    name = "lm-tokens" if curve else "lm"
    task_name = f"{name}-validation" if args.validation else name
    title = f"SmolLM2-135M on fortunes: {split_name} perplexity" + (" against tokens" if curve else "")
    # the steps each budget's run is also scored after, part-way (its own last step is scored anyway)
    part_way_steps = {steps: sorted({max(1, round(f * steps)) for f in fractions} - {steps}) for steps in budgets}
    notes = (NOTES.format(part_way=PART_WAY_NOTE if any(part_way_steps.values()) else "",
                          teacher=TEACHERS[args.teacher])
             + (CURVE_NOTES if curve else ""))
    results: dict[tuple[str, int], list] = {(v, s): [] for v in variants for s in budgets}  # rows: variant, budget
    for seed in seeds:
        train, test = train_and_scored(tokenizer, seed, block, train_block, n_eval, args.validation)
        budget.setdefault("train_blocks", []).append(len(train))  # each seed its own split
        budget["eval_tokens"] = test.ids.numel()
        for steps in budgets:
            checkpoints, tokens = part_way_steps[steps], steps * tokens_per_step
            teacher, plain = None, {}  # plain: the perplexity of each p trained without warm-up or teacher
            for variant, parsed in zip(variants, plan.parsed, strict=True):
                p, warmup, use_teacher = parsed
                model = load_variant(model_dir, p, args)
                before = perplexity(model, test)
                seconds, part_way = fine_tune(model, parsed, args, rates[variant], steps, seed, (train, test),
                                              checkpoints, distill, teacher)
                after = perplexity(model, test)
                metrics = {"tokens": float(tokens)} if curve else {}
                metrics.update({METRIC: after, "perplexity before": before})
                metrics.update({f"after {s * tokens_per_step} tokens": part_way[s] for s in checkpoints})
                if p is not None and not (warmup or use_teacher):
                    plain[p] = after
                elif p in plain:  # for +distill: the measure of distillation
                    metrics[PLAIN_RATIO] = plain[p] / after
                results[variant, steps].append(
                    measure(f"p={variant}" if p is not None else None, model, metrics, seconds))
                print(f"lm {variant} seed {seed}: ppl before {before:.1f} after {after:.1f} "
                      f"({tokens} tokens) "
                      + " ".join(f"{s * tokens_per_step} tok {part_way[s]:.1f}" for s in checkpoints)
                      + (f" ({metrics[PLAIN_RATIO]:.2f}x lower than plain)" if PLAIN_RATIO in metrics else "")
                      + f" bits/weight {results[variant, steps][-1].bits_converted:.3f} {seconds:.0f}s", flush=True)
                if p is None and args.teacher == "fp":
                    teacher = model
                del model
                publish(Task(task_name, title, METRIC, False, budget,
                             [over_seeds(r, METRIC, False) for r in results.values() if r], notes=notes,
                             x_metric="tokens" if curve else ""),
                        args.out, (seed, steps, variant) == (seeds[-1], budgets[-1], variants[-1]))


if __name__ == "__main__":
    main()
