"""Optional vLLM rollout backend for GPU users (``rollout_backend: vllm``): a :class:`gkd.sampling.Sampler`.

The student is served by an in-process (colocated) vLLM engine that holds a copy of its weights. ``sync(model)``
pushes the model's current weights into the engine (the trainer's rollout does it before every on-policy batch,
:func:`gkd.evaluation.evaluate` before evaluating); ``sample`` then decodes with vLLM's paged KV cache and continuous
batching. The result has the same ``Rollout`` format as the built-in backends, so the rest of the step is unchanged.

**Status: untested in this project's CI.** vLLM needs a CUDA GPU and is not installed on the CPU-only machines gkd is
developed and tested on, so this module is import-guarded and only exercised up to its error messages. Install with
``pip install "gkd[vllm]"``. Things to know:

- the engine can only sample the model it was built for (``model_path``, the student); ``sample(model, ...)``
  refuses a model that was not given to ``sync`` first, so the teacher (SeqKD) is never sampled through it;
- randomness: like the built-in backends, the seed comes from the ``generator`` (one draw per sampled batch, none
  when greedy), so the same seeding code drives every backend. The samples themselves differ from the built-in
  backends' for the same seed;
- weight sync uses vLLM's model ``load_weights`` (through ``LLM.apply_model`` when available); its internal APIs move
  between vLLM releases, so pin the vLLM version you validated;
- vLLM's sampler differs numerically from the training model's forward pass (kernels, precision), so rollouts are
  very slightly off-policy; this is the usual trade-off of vLLM-based RL and distillation stacks;
- LoRA students are not supported by this backend (use ``rollout_backend: auto``);
- ``vocab_size`` (the tokenizer's length) is passed as ``SamplingParams.allowed_token_ids``, so an output layer padded
  beyond the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens) never yields an id the loss cannot index.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from gkd.errors import ConfigError
from gkd.sampling.params import Rollout, SamplingParams

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
        self.model_path = model_path
        self._synced: weakref.ref[nn.Module] | None = None
        self.llm = vllm.LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enable_prefix_caching=True,
        )

    @classmethod
    def from_engine(cls, llm: Any, model_path: str, vllm: Any = None) -> VLLMSampler:
        """A sampler around an engine built elsewhere: ``llm`` (a ``vllm.LLM``) holds the weights of ``model_path``;
        ``vllm`` is the module whose ``SamplingParams`` make the requests (default: the installed vllm)."""
        if vllm is None:
            import vllm
        sampler = cls.__new__(cls)
        sampler._vllm = vllm
        sampler.model_path = model_path
        sampler._synced = None
        sampler.llm = llm
        return sampler

    def __repr__(self) -> str:
        return f"VLLMSampler({self.model_path!r})"

    def sync(self, model: nn.Module) -> None:
        """Copy ``model``'s current weights (the student's) into the engine."""
        weights = [(name, p.detach()) for name, p in model.state_dict().items()]
        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:
            engine = self.llm.llm_engine
            engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        self._synced = weakref.ref(model)

    def _engine_vocab_size(self) -> int | None:
        """Rows of the served model's output layer, when this vLLM version tells (``None`` otherwise)."""
        try:
            return int(self.llm.llm_engine.model_config.get_vocab_size())
        except Exception:  # internal API; absent or moved in some versions
            return None

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Completions for left-padded prompts (padding is dropped; vLLM takes unpadded token lists).

        ``model`` must be the module last given to :meth:`sync`: the engine samples its own copy of those weights.
        """
        if self._synced is None or self._synced() is not model:
            raise ConfigError(
                f"the vLLM engine holds a copy of {self.model_path}: call sync(model) with this model before "
                "sampling it (another model, e.g. the teacher, needs a local sampler)"
            )
        if params.max_new_tokens == 0 or prompt_ids.shape[0] == 0:
            empty = torch.zeros(prompt_ids.shape[0], 0, dtype=torch.long, device=prompt_ids.device)
            return Rollout(empty, empty.bool())
        greedy = params.greedy or params.temperature == 0
        seed = None
        if generator is not None and not greedy:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        restrict = {}
        if params.vocab_size is not None:
            rows = self._engine_vocab_size()
            if rows is None or params.vocab_size < rows:
                restrict["allowed_token_ids"] = list(range(params.vocab_size))
        eos = list(params.eos_token_ids)
        request = self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else params.temperature,
            top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop_token_ids=eos,
            seed=seed,
            **restrict,
        )
        prompts = [
            {"prompt_token_ids": row[mask.bool()].tolist()}
            for row, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())
        ]
        outputs = self.llm.generate(prompts, request, use_tqdm=False)
        seqs = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            if eos and out.outputs[0].finish_reason == "stop" and (not ids or ids[-1] not in eos):
                ids.append(eos[0])
            seqs.append(ids[: params.max_new_tokens])
        width = max(1, max(len(s) for s in seqs))
        ids_t = torch.full((len(seqs), width), params.pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids_t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask_t[i, : len(s)] = True
        return Rollout(ids_t.to(prompt_ids.device), mask_t.to(prompt_ids.device))
