"""Rollout throughput: the fast sampling backend of ``gkd.sampling`` vs ``model.generate``.

Shape (the on-policy distillation inner loop on a small student): a Llama-style model (hidden 256, 4 layers,
4 heads, MLP 768, vocab 8192, untied embeddings, float32) on 2 CPU threads, batch 8, prompts of 48 tokens,
64 sampled tokens per row. At this size ``generate`` is bound by per-step Python overhead, which is exactly what
the fast path removes.

By default EOS is an id outside the vocabulary, so no row ever stops early and both sides produce exactly
``batch * new_tokens`` tokens. ``--eos-ids N`` makes ids 1..N end a row instead (about N / vocab of the
probability mass per step on this random model), so rows stop at different steps, as real completions do, and the
fast loop's dropping of finished rows is measured too; each side then stops when all its rows have stopped. The two
contenders alternate, run by run, so drifts in machine load hit both equally; the medians are compared. The last
line is machine-readable:

    rollout_speedup_vs_generate=X

``--fast-only`` times the fast backend alone (last line ``rollout_fast_median_s=X``), for comparing two versions of
it: run the script under each version's ``PYTHONPATH`` in turn, alternating.

Usage: ``PYTHONPATH=src python benchmarks/bench_rollout.py [--runs 7] [--big-vocab] [--eos-ids 256] [--fast-only]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gkd.sampling.fast import choose_layout, fast_path_unsupported_reason
from gkd.sampling.local import sample_completions


def build_model(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=768,
        vocab_size=vocab,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(
    vocab: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    runs: int,
    warmup: int,
    eos_ids: int = 0,
    fast_only: bool = False,
) -> dict[str, float]:
    """Median seconds per rollout of each contender (``fast``, and ``generate`` unless ``fast_only``)."""
    torch.manual_seed(0)
    model = build_model(vocab)
    input_ids = torch.randint(0, vocab, (batch, prompt_len))
    attention_mask = torch.ones_like(input_ids)
    stop = list(range(1, 1 + eos_ids)) or [vocab]  # [vocab]: an EOS id that can never be sampled
    assert fast_path_unsupported_reason(model, prompt_len + new_tokens) is None

    def run_generate() -> None:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                use_cache=True,
                eos_token_id=stop,
                pad_token_id=0,
            )
        assert out.shape[0] == batch and out.shape[1] <= prompt_len + new_tokens

    generator = torch.Generator().manual_seed(0)

    def run_fast() -> None:
        rollout = sample_completions(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=new_tokens,
            eos_token_ids=stop,
            pad_token_id=0,
            generator=generator,
            backend="fast",
        )
        assert rollout.completion_ids.shape[0] == batch and rollout.completion_ids.shape[1] <= new_tokens

    contenders = {"fast": run_fast} if fast_only else {"generate": run_generate, "fast": run_fast}
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            times[name].append(time_once(fn))

    tokens = batch * new_tokens
    print(
        f"\nLlama h256 L4 vocab {vocab}, batch {batch}, prompt {prompt_len}, new {new_tokens}, {runs} runs, "
        f"{eos_ids or 'no'} EOS ids, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fast-path weights: {choose_layout([model])}"
    )
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        runs_txt = " ".join(f"{v:.3f}" for v in values)
        print(
            f"  {name:9s} median {medians[name]:.3f} s  {tokens / medians[name]:8.0f} tok/s"
            f"  {1e3 * medians[name] / new_tokens:6.2f} ms/step   runs: {runs_txt}"
        )
    if "generate" in medians:
        print(f"  speed-up (generate / fast): {medians['generate'] / medians['fast']:.2f}x")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big-vocab", action="store_true", help="also run the vocab 65,536 variant")
    parser.add_argument("--eos-ids", type=int, default=0, help="ids 1..N end a row (0: no row ever stops)")
    parser.add_argument("--fast-only", action="store_true", help="time the fast backend alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = (
        args.batch,
        args.prompt_len,
        args.new_tokens,
        args.runs,
        args.warmup,
        args.eos_ids,
        args.fast_only,
    )
    medians = bench(8192, *shape)
    if args.big_vocab:
        bench(65536, *shape)
    if args.fast_only:
        print(f"rollout_fast_median_s={medians['fast']:.4f}")
    else:
        print(f"rollout_speedup_vs_generate={medians['generate'] / medians['fast']:.2f}")


if __name__ == "__main__":
    main()
