"""Causal language modelling from scratch: a small byte-level Llama on the Debian ``fortunes`` text, fp vs TBN.

Every variant starts from the same freshly initialised ``LlamaForCausalLM`` (seeded), TBN variants
converted before training with :func:`hf_tbn.quantize_model` (every decoder Linear tiled; the
embeddings and the lm_head stay full precision, as the quantizer decides), and trains with the same
budget (steps, batch, learning rate and schedule, seed). Text and splits as in quality_lm.py (5% of
the fortunes held out, shuffled with the seed), tokenized as UTF-8 bytes (vocabulary 256), so the
tiled layers are most of the model and the perplexity is per byte. Variants as in quality_bbc.py:
``fp``, ``P``, ``P+warmup``, ``P+distill`` (teacher: the ``fp`` variant trained with the same seed,
so ``fp`` must come first). ``--validation`` scores on blocks from the end of the training split
(for choosing settings such as ``--lr``), otherwise on the held-out fortunes. Why this model and
budget: docs/quality.md ("Language modelling from scratch"). A budget other than the default ``--steps`` gets a
table of its own (task ``lm_scratch-<steps>steps``), beside the default budget's instead of in its place.

    .venv/bin/python scripts/quality_lm_scratch.py --seeds 0,1,2                   # full grid, writes docs/
    .venv/bin/python scripts/quality_lm_scratch.py --validation --variants fp,4 --lr 2e-3 --out /tmp/v
    .venv/bin/python scripts/quality_lm_scratch.py --seeds 0,1,2 --steps 1200 --lr 1e-3   # its own table
    .venv/bin/python scripts/quality_lm_scratch.py --quick --out /tmp/q           # CI smoke run
"""

from __future__ import annotations

from quality_lm import perplexity, train_and_scored
from results import (
    Task,
    add_lr_option,
    add_variant_options,
    budget_rates,
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
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, set_seed

from hf_tbn import TBNConfig, pack_model, quantize_model

VARIANTS = "fp,1,4,8"
QUICK_VARIANTS = "fp,4+warmup+distill"
METRIC = "perplexity"
STEPS = 300  # the default budget, the one issue 15's targets were measured at
HIDDEN = 256  # every decoder Linear then has >= 65,536 weights, above TBNConfig's min_compress_size (64,000)
NOTES = ("Byte-level (vocabulary 256) Llama trained from scratch; perplexity per byte. Converted: every decoder "
         "Linear; embeddings, norms and the lm_head stay full precision. 'x fp': the variant's perplexity over fp's "
         "with the same seed (a mean of per-seed ratios). +warmup: hf_tbn.qat.QuantizationWarmup; +distill: "
         "hf_tbn.distill.DistillationTrainer, teacher = the fp row's model trained with the same seed.")


def encode_bytes(text: str) -> dict[str, list[int]]:
    """The byte-level tokenizer: UTF-8 bytes as token ids (what quality_lm.fortunes calls a tokenizer)."""
    return {"input_ids": list(text.encode("utf-8"))}


def scratch_model(layers: int, block: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised byte-level Llama: ``layers`` blocks of width 256, 4 heads, MLP 1024 (5.4M parameters
    with 5 layers), seeded so every variant of a seed starts from the same weights."""
    set_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=layers,
                         num_attention_heads=HIDDEN // 64, num_key_value_heads=HIDDEN // 64,
                         max_position_embeddings=block, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = quality_parser(__doc__, several_seeds=True)
    parser.add_argument("--layers", type=int, default=5, help="decoder blocks (width 256)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {STEPS}, --quick 2)")
    parser.add_argument("--batch", type=int, default=8, help="blocks per step")
    parser.add_argument("--block", type=int, default=128, help="bytes per block")
    add_lr_option(parser, "2e-3")
    parser.add_argument("--eval-blocks", type=int, default=256)
    add_variant_options(parser, VARIANTS)
    args = parser.parse_args()
    plan = variant_plan(args, VARIANTS, QUICK_VARIANTS, fp_teacher=True)
    variants, distill, seeds = plan.names, plan.distill, seeds_of(args)
    rates = variant_rates(parser, args.lr, variants)
    layers, block = (1, 32) if args.quick else (args.layers, args.block)
    steps = args.steps or (2 if args.quick else STEPS)
    other_budget = args.steps not in (None, STEPS)  # a table of its own
    name = "lm_scratch" + (f"-{steps}steps" if other_budget else "")
    n_eval = 4 if args.quick else args.eval_blocks
    split_name = "validation" if args.validation else "held-out"
    budget = {"layers": layers, "hidden": HIDDEN, "vocab": 256, "steps": steps, "batch_size": args.batch,
              "block_bytes": block, "lr": budget_rates(rates), "scheduler": "cosine, 5% warm-up", "optimizer": "AdamW",
              "seeds": seeds, "scored_on": split_name, "warmup": args.warmup, **layer_options(args),
              "distill": vars(distill) if plan.distills else None}
    results: dict[str, list] = {v: [] for v in variants}
    for seed in seeds:
        train, test = train_and_scored(encode_bytes, seed, block, block, n_eval, args.validation)
        budget.setdefault("train_blocks", []).append(len(train))  # each seed its own split
        budget["eval_bytes"] = test.ids.numel()
        teacher, fp_perplexity = None, None
        for variant, (p, warmup, use_teacher) in zip(variants, plan.parsed, strict=True):
            model = scratch_model(layers, block, seed)
            budget["parameters"] = sum(t.numel() for t in model.parameters())
            if p is not None:
                quantize_model(model, TBNConfig(compression_factor=p, **layer_options(args)))
            targs = TrainingArguments(
                output_dir=trainer_output_dir(), max_steps=steps, per_device_train_batch_size=args.batch,
                learning_rate=rates[variant], lr_scheduler_type="cosine", warmup_steps=0.05, save_strategy="no",
                report_to="none", use_cpu=True, seed=seed, data_seed=seed, logging_steps=50, disable_tqdm=True,
            )
            seconds = train_variant((p, warmup, use_teacher), args.warmup, distill, teacher, model=model, args=targs,
                                    train_dataset=train)
            if p is None:
                teacher = model
            else:
                pack_model(model)
            value = perplexity(model, test)
            fp_perplexity = value if p is None else fp_perplexity
            metrics = {METRIC: value} | ({"x fp": value / fp_perplexity} if fp_perplexity else {})
            results[variant].append(measure(f"p={variant}" if p is not None else None, model, metrics, seconds))
            print(f"lm_scratch {variant} seed {seed}: {split_name} perplexity {value:.3f}"
                  + (f" ({value / fp_perplexity:.3f}x fp)" if fp_perplexity else "")
                  + f"  bits/weight {results[variant][-1].bits_converted:.3f}  {seconds:.0f}s", flush=True)
            title = (f"Byte-level Llama ({layers}x{HIDDEN}) trained from scratch on fortunes: {split_name} perplexity"
                     + (f", {steps} steps" if other_budget else ""))
            rows = [over_seeds(r, METRIC, False) for r in results.values() if r]
            publish(Task(f"{name}-validation" if args.validation else name, title, METRIC, False, budget,
                         rows, notes=NOTES), args.out, seed == seeds[-1] and variant == variants[-1])


if __name__ == "__main__":
    main()
