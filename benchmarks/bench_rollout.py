"""Rollout throughput: the fast sampling backend of ``gkd.sampling`` vs ``model.generate``.

Shape (the on-policy distillation inner loop on a small student): a Llama-style model (hidden 256, 4 layers,
4 heads, MLP 768, vocab 8192, untied embeddings, float32) on 2 CPU threads, batch 8, prompts of 48 tokens,
64 sampled tokens per row. At this size ``generate`` is bound by per-step Python overhead, which is exactly what
the fast path removes.

EOS is an id outside the vocabulary, so no row ever stops early and both sides produce exactly
``batch * new_tokens`` tokens. The two contenders alternate, run by run, so drifts in machine load hit both
equally; the medians are compared. The last line is machine-readable:

    rollout_speedup_vs_generate=X

Usage: ``PYTHONPATH=src python benchmarks/bench_rollout.py [--runs 7] [--big-vocab]``
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


def bench(vocab: int, batch: int, prompt_len: int, new_tokens: int, runs: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = build_model(vocab)
    input_ids = torch.randint(0, vocab, (batch, prompt_len))
    attention_mask = torch.ones_like(input_ids)
    never = vocab  # an EOS id that can never be sampled
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
                eos_token_id=never,
                pad_token_id=0,
            )
        assert out.shape == (batch, prompt_len + new_tokens)

    generator = torch.Generator().manual_seed(0)

    def run_fast() -> None:
        rollout = sample_completions(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=new_tokens,
            eos_token_ids=[never],
            pad_token_id=0,
            generator=generator,
            backend="fast",
        )
        assert rollout.completion_ids.shape == (batch, new_tokens)

    for _ in range(warmup):
        run_generate()
        run_fast()
    times: dict[str, list[float]] = {"generate": [], "fast": []}
    for _ in range(runs):
        times["generate"].append(time_once(run_generate))
        times["fast"].append(time_once(run_fast))

    tokens = batch * new_tokens
    print(
        f"\nLlama h256 L4 vocab {vocab}, batch {batch}, prompt {prompt_len}, new {new_tokens}, {runs} runs, "
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
    speedup = medians["generate"] / medians["fast"]
    print(f"  speed-up (generate / fast): {speedup:.2f}x")
    return speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big-vocab", action="store_true", help="also run the vocab 65,536 variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    speedup = bench(8192, args.batch, args.prompt_len, args.new_tokens, args.runs, args.warmup)
    if args.big_vocab:
        bench(65536, args.batch, args.prompt_len, args.new_tokens, args.runs, args.warmup)
    print(f"rollout_speedup_vs_generate={speedup:.2f}")


if __name__ == "__main__":
    main()
