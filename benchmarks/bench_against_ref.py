"""Is this tree's training step as fast as an earlier revision's? (a guard for refactors)

Exports ``--ref`` (a git revision, default ``HEAD~1``) with ``git archive`` into a temporary folder, then times
``GKDTrainer.train_step`` of both trees on the setup of ``bench_vs_trl.py`` (Llama-style teacher 25.2M / student
7.6M parameters, fp32, batch 8 × (48 prompt + 64 new tokens), on-policy, JSD(0.5)). Each tree runs in its own
process, alternating tree by tree for ``--rounds`` rounds, so machine load hits both alike; each process warms up,
then times ``--steps`` steps. Prints the median of the per-round medians of each tree and their ratio.

    python benchmarks/bench_against_ref.py [--ref 5e20cf3] [--vocab 8192] [--rounds 5] [--steps 8]

The reference revision must have ``benchmarks/bench_vs_trl.py`` with ``_gkd_trainer`` (every revision since the
benchmark was written does).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import argparse, importlib.util, statistics, sys, tempfile, time
from pathlib import Path
root, vocab, steps, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, str(root / "src"))
spec = importlib.util.spec_from_file_location("bench", root / "benchmarks" / "bench_vs_trl.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
trainer = bench._gkd_trainer(argparse.Namespace(vocab=vocab, workdir=Path(tempfile.mkdtemp()), threads=threads))
for _ in range(2):
    trainer.train_step()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    trainer.train_step()
    times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def _median_step(tree: Path, args: argparse.Namespace) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(args.vocab), str(args.steps), str(args.threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD~1", help="git revision to compare with")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gkd-ref-") as tmp:
        ref = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.ref], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(ref)], input=archive.stdout, check=True)
        times: dict[str, list[float]] = {"this": [], "ref": []}
        for r in range(args.rounds):
            for name, tree in (("ref", ref), ("this", ROOT)):
                times[name].append(_median_step(tree, args))
            print(f"round {r + 1}: ref {times['ref'][-1]:.3f} s, this {times['this'][-1]:.3f} s", flush=True)
    this, ref_s = statistics.median(times["this"]), statistics.median(times["ref"])
    print(f"step_seconds_this={this:.4f} step_seconds_ref={ref_s:.4f} ({args.ref}, vocab {args.vocab})")
    print(f"step_ratio_this_over_ref={this / ref_s:.3f}  (<= 1.05: not slower, within noise)")


if __name__ == "__main__":
    main()
