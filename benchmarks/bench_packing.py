"""Packed forwards against padded ones on ragged data: real tokens per second and peak memory of a training pass.

What is measured (``--device``: CPU by default, CUDA when asked for and present):

* **Data.** ``--sequences`` (default 64) sequences with a fixed seed: prompt lengths log-normal (median 96,
  sigma 1) clipped to [16, 1,024], completion lengths uniform in [1, 256]; token ids uniform over the vocabulary.
  They are cut in order into micro-batches of ``--batch-size`` (default 8) sequences, padded as gkd pads them
  (prompts on the left, completions on the right: :func:`gkd.data.pad_left` / :func:`gkd.data.pad_right`).
* **Models.** Llama-style models built from a config with fixed seeds (``gkd.models.build_model``): a student of
  hidden size 64 (2 layers, 4 heads) and a teacher of hidden size 128 (2 layers, 4 heads), vocabulary 512,
  ``--attn`` attention kernel (``sdpa`` by default).
* **One pass** per micro-batch, as the step runs it: the teacher's view (``gkd.teacher.Teacher``), the student's
  forward (``gkd.forward.StudentForward``), the JSD(0.5) objective (``gkd.objective.Objective``), backward.
  ``padded``: ``packed_forward: false``; ``packed``: both models packed (``gkd.forward.set_packed_forward``).
  One warm-up micro-batch, then ``--repeats`` passes over all micro-batches; the time is the best repeat.
* **Token budgets** (``--max-tokens-per-batch N``): the same sequences regrouped into micro-batches of at most N
  forward tokens (``gkd.data.token_groups``: real tokens for the packed path, rows x padded width for the padded
  one), as ``max_tokens_per_batch`` regroups a step's sequences.
* **Real tokens per second**: the sequences' tokens (prompt + completion) over the pass's seconds, the same count
  for both paths, so ``packed_speedup`` is the ratio of the two times.
* **Peak memory**: each path runs in a child process of its own (same seeds, same data); on CUDA the peak of
  ``torch.cuda.max_memory_allocated``, on the CPU the growth of the child's peak RSS (``ru_maxrss``) over its RSS
  after the models and data were built.

Usage (from the repository root):

    python benchmarks/bench_packing.py                 # 64 sequences, 2 repeats: a few minutes on 2 cores
    python benchmarks/bench_packing.py --quick         # 16 sequences, 1 repeat: a smoke run (~30 s)
    python benchmarks/bench_packing.py --threads 1 --clock cpu   # on a busy machine: process CPU time
    python benchmarks/bench_packing.py --max-tokens-per-batch 4096   # micro-batches by token count, both paths

It prints one line per path and ends with ``packed_speedup=``, ``peak_mb_padded=``, ``peak_mb_packed=``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch

VOCAB = 512


def ragged_batches(n: int, batch_size: int, seed: int, device: str) -> list:
    """``n`` ragged sequences (see the module docstring) in micro-batches of ``batch_size``."""
    from gkd.data import Batch, pad_left, pad_right

    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.exp(torch.randn(n, generator=g) + torch.log(torch.tensor(96.0))).clamp(16, 1024).long()
    completion_len = torch.randint(1, 257, (n,), generator=g)
    batches = []
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        prompts = [torch.randint(3, VOCAB, (int(prompt_len[i]),), generator=g).tolist() for i in rows]
        completions = [torch.randint(3, VOCAB, (int(completion_len[i]),), generator=g).tolist() for i in rows]
        p, pm = pad_left(prompts, 0)
        c, cm = pad_right(completions, 0)
        batches.append(Batch(p, pm, c, cm, [{} for _ in rows]).to(device))
    return batches


def models(attn: str, device: str):
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from gkd.models import build_model

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t1")),
        pad_token="t0",
        eos_token="t2",
        unk_token="t1",
    )
    common = dict(
        architecture="llama", num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1536
    )
    student = build_model({**common, "hidden_size": 64, "intermediate_size": 128}, tokenizer, seed=1)
    teacher = build_model({**common, "hidden_size": 128, "intermediate_size": 256}, tokenizer, seed=0)
    for m in (student, teacher):
        m.config._attn_implementation = attn
    return student.to(device), teacher.to(device)


def child(args: argparse.Namespace) -> None:
    """One path in this process: print its seconds, real tokens and peak memory as JSON."""
    from gkd.config import GKDConfig
    from gkd.forward import StudentForward, set_packed_forward
    from gkd.objective import Objective
    from gkd.teacher import Teacher

    torch.set_num_threads(args.threads)
    student, teacher_model = models(args.attn, args.device)
    for m in (student, teacher_model):
        reason = set_packed_forward(m, "auto" if args.path == "packed" else False)
        assert (reason is None) == (args.path == "packed"), reason
    teacher, forward = Teacher(teacher_model, VOCAB), StudentForward(student, VOCAB)
    objective = Objective.from_config(GKDConfig(divergence="jsd", beta=0.5))
    batches = ragged_batches(args.sequences, args.batch_size, args.seed, args.device)
    if args.max_tokens_per_batch:  # the same sequences regrouped by token count, as max_tokens_per_batch does
        from gkd.data import select_rows, token_groups

        groups = token_groups(batches, args.max_tokens_per_batch, packed=args.path == "packed")
        batches = [select_rows(batches, group, 0) for group in groups]
    real = sum(int(b.prompt_mask.sum() + b.completion_mask.sum()) for b in batches)
    padded = sum(b.size * (b.prompt_ids.shape[1] + b.completion_ids.shape[1]) for b in batches)

    def one(batch) -> None:
        p_t = teacher.view(batch)
        p_s = forward(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        objective.loss(batch, p_s, p_t, float(objective.count(batch))).backward()
        student.zero_grad(set_to_none=True)

    cuda = args.device.startswith("cuda")
    clock = time.process_time if args.clock == "cpu" and not cuda else time.perf_counter
    base_rss = _rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    one(batches[0])  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        for batch in batches:
            one(batch)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _max_rss_mb() - base_rss
    print(
        json.dumps(
            {
                "seconds": best,
                "real_tokens": real,
                "padded_tokens": padded,
                "peak_mb": peak,
                "micro_batches": len(batches),
            }
        )
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (busy machines)"
    )
    ap.add_argument("--quick", action="store_true", help="16 sequences, 1 repeat")
    ap.add_argument(
        "--max-tokens-per-batch",
        type=int,
        help="regroup the micro-batches by token count (max_tokens_per_batch)",
    )
    ap.add_argument("--path", choices=["padded", "packed"], help=argparse.SUPPRESS)  # a child's path
    args = ap.parse_args()
    if args.quick:
        args.sequences, args.repeats = 16, 1
    if args.path:
        return child(args)
    results = {}
    for path in ("padded", "packed"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
        r = results[path]
        print(
            f"{path:7s} {r['seconds']:8.2f} s  {r['real_tokens'] / r['seconds']:9.0f} real tokens/s  "
            f"peak {r['peak_mb']:8.1f} MB  ({r['real_tokens']} real of {r['padded_tokens']} padded tokens, "
            f"{r['micro_batches']} micro-batches)"
        )
    print(
        f"device={args.device} attn={args.attn} sequences={args.sequences} batch_size={args.batch_size} "
        f"threads={args.threads} clock={args.clock} max_tokens_per_batch={args.max_tokens_per_batch}"
    )
    print(f"packed_speedup={results['padded']['seconds'] / results['packed']['seconds']:.2f}")
    print(f"peak_mb_padded={results['padded']['peak_mb']:.1f}")
    print(f"peak_mb_packed={results['packed']['peak_mb']:.1f}")


if __name__ == "__main__":
    main()
