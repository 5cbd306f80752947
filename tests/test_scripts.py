"""The benchmark and quality scripts run in their quick modes so they cannot rot."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def test_bench_train_quick() -> None:
    stdout = run_script("bench_train.py", "--quick")
    rows = [line.split() for line in stdout.splitlines()[2:]]
    assert len(rows) == 6
    assert all(float(row[-1]) > 0 for row in rows)  # a ratio was measured for every row


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


@pytest.mark.parametrize(
    ("script", "tasks", "variants"),
    [
        ("quality_fashion_mnist.py", ["fashion_mnist-mlp", "fashion_mnist-cnn", "fashion_mnist-resnet"], 6),
        ("quality_bbc.py", ["bbc"], 2),
        ("quality_timeseries.py", ["timeseries"], 2),
    ],
)
def test_quality_script_quick(tmp_path: Path, script: str, tasks: list[str], variants: int) -> None:
    stdout = run_script(script, "--quick", "--out", str(tmp_path))
    check_published(tmp_path, stdout, tasks, variants)


def test_quality_fashion_mnist_seeds_quick(tmp_path: Path) -> None:
    """Several seeds give one row per chosen variant with the spread over the seeds, scored on the validation
    split when asked, with the tile layout asked for; a bad variant (or one that needs a teacher, which this
    script's own loop has not) is refused, and so is a learning rate for a variant that does not run."""
    stdout = run_script("quality_fashion_mnist.py", "--quick", "--out", str(tmp_path), "--tasks", "resnet",
                        "--variants", "fp,8+warmup", "--seeds", "0,1", "--validation", "--lr", "1e-3,8+warmup=3e-3",
                        "--tile-layout", "input")
    check_published(tmp_path, stdout, ["fashion_mnist-resnet-validation"], 2)
    budget = json.loads((tmp_path / "results" / "fashion_mnist-resnet-validation.json").read_text())["budget"]
    assert budget["lr"] == {"fp": 1e-3, "8+warmup": 3e-3} and budget["tile_layout"] == "input"
    header, _, *rows = table_lines(stdout)
    assert "validation accuracy % std" in header and "worst seed" in header
    assert [row.split("|")[1].strip() for row in rows] == ["fp", "p=8+warmup"]
    cells = [[float(cell) for cell in row.split("|")[2:6]] for row in rows]  # mean, std, worst seed, seeds
    assert all(seeds == 2 and std >= 0 and worst <= mean for mean, std, worst, seeds in cells)
    for args, message in ((["--variants", "fp,x"], "variant 'x'"),
                          (["--variants", "fp,4+distill"], "variant '4+distill'"),
                          (["--variants", "fp,4", "--lr", "1e-3,8=3e-3"], "--lr sets a rate for 8"),
                          (["--lr", "1e-3,4=-1"], "--lr item '4=-1'")):
        refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "quality_fashion_mnist.py"), *args],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and message in refused.stderr, (args, refused.stderr[-500:])


def test_quality_bbc_own_teacher_quick(tmp_path: Path) -> None:
    """--teacher-epochs: the +distill variants learn from a separate fp model trained that long, scored as its own
    row and recorded in the budget; no fp variant is needed first."""
    stdout = run_script("quality_bbc.py", "--quick", "--out", str(tmp_path), "--variants", "4+warmup+distill",
                        "--teacher-epochs", "3")
    task = json.loads((tmp_path / "results" / "bbc.json").read_text())
    assert [row["variant"] for row in task["rows"]] == ["fp, 3 epochs (teacher)", "p=4+warmup+distill"]
    assert task["budget"]["teacher_epochs"] == 3 and "bbc teacher seed 0" in stdout


def test_quality_lm_quick(tmp_path: Path, smollm2_dir: Path) -> None:
    """The +distill variant learns from the fp variant fine-tuned first (--teacher fp), each at its own rate; over
    two seeds, with its perplexity against plain QAT's as the mean of the per-seed ratios."""
    stdout = run_script("quality_lm.py", "--quick", "--out", str(tmp_path), "--cache", str(smollm2_dir),
                        "--teacher", "fp", "--lr", "1e-3,fp=2e-4", "--variants", "fp,4,4+distill", "--seeds", "0,1")
    check_published(tmp_path, stdout, ["lm"], 3)
    task = json.loads((tmp_path / "results" / "lm.json").read_text())
    assert task["budget"]["lr"] == {"fp": 2e-4, "4": 1e-3, "4+distill": 1e-3}
    assert task["budget"]["seeds"] == [0, 1]
    assert len(task["budget"]["train_blocks"]) == 2  # each seed its own split
    plain, distilled = ({seed: float(m) for seed, m in re.findall(rf"lm {v} seed (\d): ppl before \S+ after (\S+) ",
                                                                   stdout)} for v in ("4", "4\\+distill"))
    rows = {row["variant"]: row["metrics"] for row in task["rows"]}
    assert rows["p=4+distill"]["seeds"] == 2 and "x lower than plain" not in rows["p=4"]
    ratio = sum(plain[s] / distilled[s] for s in ("0", "1")) / 2
    assert rows["p=4+distill"]["x lower than plain"] == pytest.approx(ratio, rel=1e-3)  # printed to 0.1
    assert task["budget"]["teacher"] == "the fp row's model after its fine-tuning"
    assert "teacher = the fp row's model" in (tmp_path / "results.md").read_text()
    assert "scored part-way" in task["notes"]  # the quick run's 'after N tokens' column


def test_quality_lm_token_curve_quick(tmp_path: Path, smollm2_dir: Path) -> None:
    """--steps with several budgets: every variant trained once per budget (its own whole schedule), a row per
    variant and budget with its tokens, the distilled row's ratio against the plain row of the same budget, and a
    plot of perplexity against tokens."""
    stdout = run_script("quality_lm.py", "--quick", "--out", str(tmp_path), "--cache", str(smollm2_dir),
                        "--variants", "4,4+distill", "--steps", "3,2")
    check_published(tmp_path, stdout, ["lm-tokens"], 4)
    task = json.loads((tmp_path / "results" / "lm-tokens.json").read_text())
    assert task["x_metric"] == "tokens" and task["budget"]["steps"] == [2, 3]
    rows = {(row["variant"], row["metrics"]["tokens"]): row["metrics"] for row in task["rows"]}
    assert list(rows) == [("p=4", 256.0), ("p=4", 384.0), ("p=4+distill", 256.0), ("p=4+distill", 384.0)]
    printed = {(v, int(n)): float(m) for v, m, n in re.findall(r"lm (\S+) seed 0: ppl before \S+ after (\S+) \((\d+) "
                                                                r"tokens\)", stdout)}
    for tokens in (256, 384):  # steps x 4 blocks x 32 tokens
        assert rows["p=4", tokens]["perplexity after fine-tuning"] == pytest.approx(printed["4", tokens], rel=1e-3)
        ratio = printed["4", tokens] / printed["4+distill", tokens]
        assert rows["p=4+distill", tokens]["x lower than plain"] == pytest.approx(ratio, rel=1e-3)
    assert printed["4", 256] != printed["4", 384]  # each budget trained on its own
    assert "against tokens](results/lm-tokens.png)" in (tmp_path / "results.md").read_text()
    assert "scored part-way" not in task["notes"]  # no part-way columns in a curve


@pytest.mark.parametrize("steps", ["0,60", "60,x", ""])
def test_quality_lm_refuses_bad_steps(steps: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "quality_lm.py"), "--steps", steps],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"steps {steps!r}: expected comma-separated integers of at least 1" in result.stderr


def test_quality_lm_scratch_quick(tmp_path: Path) -> None:
    """A budget other than the default gets its own table; each variant trains at its own --lr, the TBN ones with
    the --alpha-param asked for."""
    stdout = run_script("quality_lm_scratch.py", "--quick", "--out", str(tmp_path), "--steps", "3", "--lr",
                        "2e-3,fp=1e-3", "--alpha-param", "scalars")
    check_published(tmp_path, stdout, ["lm_scratch-3steps"], 2)
    budget = json.loads((tmp_path / "results" / "lm_scratch-3steps.json").read_text())["budget"]
    assert budget["steps"] == 3 and budget["alpha_param"] == "scalars"
    assert budget["lr"] == {"fp": 1e-3, "4+warmup+distill": 2e-3}


def check_published(out: Path, stdout: str, tasks: list[str], variants: int) -> None:
    """results.md holds exactly the tables the script printed, and every task has its plot."""
    printed = table_lines(stdout)
    assert len(printed) == len(tasks) * (2 + variants)
    document = (out / "results.md").read_text()
    assert sorted(table_lines(document)) == sorted(printed)  # the document orders tasks by name
    commands = [line for line in document.splitlines() if line.startswith("Command: ")]
    assert len(commands) == len(tasks) and all("--quick" in c and "--out" not in c for c in commands)
    for task in tasks:
        assert (out / "results" / f"{task}.json").exists()
        assert (out / "results" / f"{task}.png").stat().st_size > 1000
        assert f"](results/{task}.png)" in document
