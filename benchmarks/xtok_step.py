"""Cross-tokenizer step time over the same-tokenizer step, on the same model sizes, measured in one run.

The student and a word-level tokenizer of ``--vocab`` words; the teacher is the same model twice: once with the
student's tokenizer (the same-tokenizer path) and once with its embedding rows moved to a permuted tokenizer (every
student position is a one-token match: the common case the projection's fast path serves). One timed step is what
differs between the two, on an on-policy batch: the teacher's view, the student's forward pass, the objective and
backward (the rollout, identical for both, is left out, so the ratio is an upper bound on the full step's). Prints
the median of ``--repeats`` steps for each and ``xtok_step_ratio=`` (target <= 1.5).

    python benchmarks/xtok_step.py                       # a few seconds on a CPU
    python benchmarks/xtok_step.py --vocab 8000 --batch 16 --length 64
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import time

import torch

from gkd.config import GKDConfig
from gkd.data import Example, collate
from gkd.forward import score_positions
from gkd.models import build_model
from gkd.objective import Objective
from gkd.tasks.base import build_word_tokenizer
from gkd.teacher import Teacher
from gkd.xtok import AlignedTeacher

STUDENT = {"architecture": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "max_position_embeddings": 256, "tie_word_embeddings": True}  # fmt: skip
TEACHER = {**STUDENT, "hidden_size": 128, "intermediate_size": 256}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--divergence", default="jsd")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    words = [f"w{i}" for i in range(args.vocab)]
    student_tok = build_word_tokenizer(words)
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    teacher_tok = build_word_tokenizer(shuffled)
    student = build_model(STUDENT, student_tok, seed=0)
    teacher = build_model(TEACHER, student_tok, seed=1)
    moved = copy.deepcopy(teacher)
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    perm = torch.tensor([s_vocab[w] for w, _ in sorted(t_vocab.items(), key=lambda kv: kv[1])])
    with torch.no_grad():
        moved.get_input_embeddings().weight.copy_(teacher.get_input_embeddings().weight[perm])
    rng = random.Random(1)
    examples = []
    for _ in range(args.batch):
        prompt = student_tok(" ".join(rng.choice(words) for _ in range(8)))["input_ids"]
        completion = student_tok(" ".join(rng.choice(words) for _ in range(args.length - 1)))["input_ids"]
        examples.append(
            Example(prompt, [*completion, student_tok.eos_token_id], {"prompt": student_tok.decode(prompt)})
        )
    batch = dataclasses.replace(collate(examples, student_tok.pad_token_id), on_policy=True)
    objective = Objective.from_config(GKDConfig(divergence=args.divergence))
    same = Teacher(teacher, len(student_tok))
    aligned = AlignedTeacher(moved, student_tok, teacher_tok, len(student_tok))

    def step(t) -> float:
        start = time.perf_counter()
        student.zero_grad()
        p_t = t.view(batch)
        p_s = score_positions(
            student, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
        )
        objective.loss(batch, p_s, p_t, float(batch.num_tokens())).backward()
        return time.perf_counter() - start

    step(same), step(aligned)  # warm-up (the aligned pair's per-token tables are built here)
    times_same, times_aligned = [], []
    for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
        times_same.append(step(same))
        times_aligned.append(step(aligned))
    a, b = statistics.median(times_same), statistics.median(times_aligned)
    print(f"same-tokenizer step {a * 1e3:.1f} ms, cross-tokenizer step {b * 1e3:.1f} ms "
          f"(vocab {args.vocab}, batch {args.batch} x {args.length} tokens, {args.divergence})")  # fmt: skip
    print(f"xtok_step_ratio={b / a:.2f}")


if __name__ == "__main__":
    main()
