"""Optional vLLM rollout backend for GPU users (``rollout_backend: vllm``).

The student is served by an in-process (colocated) vLLM engine that holds a copy of its weights; before each rollout
the trainer pushes the current weights into the engine, then samples with vLLM's paged KV cache and continuous
batching. The result has the same ``Rollout`` format as the built-in backends, so the rest of the step is unchanged.

**Status: untested in this project's CI.** vLLM needs a CUDA GPU and is not installed on the CPU-only machines gkd is
developed and tested on, so this module is import-guarded and only exercised up to its error messages. Install with
``pip install "gkd[vllm]"``. Things to know:
- weight sync uses vLLM's model ``load_weights`` (through ``LLM.apply_model`` when available); its internal APIs move
  between vLLM releases, so pin the vLLM version you validated;
- vLLM's sampler differs numerically from the training model's forward pass (kernels, precision), so rollouts are
  very slightly off-policy; this is the usual trade-off of vLLM-based RL and distillation stacks;
- LoRA students are not supported by this backend (use ``rollout_backend: auto``);
- ``vocab_size`` (the tokenizer's length) is passed as ``SamplingParams.allowed_token_ids``, so an output layer padded
  beyond the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens) never yields an id the loss cannot index.
"""

from __future__ import annotations

from typing import Any

import torch

from gkd.errors import ConfigError

__all__ = ["VLLMSampler"]


class VLLMSampler:
    """Sample completions for token-id prompts with a colocated vLLM engine holding the student's weights."""

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.3, dtype: str = "auto") -> None:
        try:
            import vllm
        except ImportError as e:
            raise ConfigError(
                "rollout_backend: vllm needs the vllm package and a CUDA GPU (pip install 'gkd[vllm]'); "
                "use rollout_backend: auto on CPU"
            ) from e
        if not torch.cuda.is_available():
            raise ConfigError("rollout_backend: vllm needs a CUDA GPU; use rollout_backend: auto on CPU")
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enable_prefix_caching=True,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the student's current weights into the engine."""
        weights = [(name, p.detach()) for name, p in model.state_dict().items()]
        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(lambda m: m.load_weights(weights))
            return
        engine = self.llm.llm_engine
        engine.model_executor.driver_worker.model_runner.model.load_weights(weights)

    def _engine_vocab_size(self) -> int | None:
        """Rows of the served model's output layer, when this vLLM version tells (``None`` otherwise)."""
        try:
            return int(self.llm.llm_engine.model_config.get_vocab_size())
        except Exception:  # internal API; absent or moved in some versions
            return None

    @torch.no_grad()
    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        greedy: bool,
        eos_token_ids: list[int],
        pad_token_id: int,
        seed: int,
        vocab_size: int | None = None,
    ) -> Any:
        """Completions for left-padded prompts (padding is dropped; vLLM takes unpadded token lists).

        ``vocab_size`` restricts sampling to ids ``< vocab_size`` (the tokenizer's length).
        """
        from gkd.rollout import Rollout

        restrict = {}
        if vocab_size is not None:
            rows = self._engine_vocab_size()
            if rows is None or vocab_size < rows:
                restrict["allowed_token_ids"] = list(range(vocab_size))
        params = self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else temperature,
            top_k=top_k if top_k > 0 else -1,
            top_p=top_p,
            max_tokens=max_new_tokens,
            stop_token_ids=eos_token_ids,
            seed=seed,
            **restrict,
        )
        prompts = [
            {"prompt_token_ids": row[mask.bool()].tolist()}
            for row, mask in zip(input_ids.cpu(), attention_mask.cpu())
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seqs = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            if out.outputs[0].finish_reason == "stop" and (not ids or ids[-1] not in eos_token_ids):
                ids.append(eos_token_ids[0])
            seqs.append(ids[:max_new_tokens])
        width = max(1, max(len(s) for s in seqs))
        ids_t = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids_t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask_t[i, : len(s)] = True
        return Rollout(ids_t.to(input_ids.device), mask_t.to(input_ids.device))
