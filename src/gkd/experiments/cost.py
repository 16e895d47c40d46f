"""What a study's run cost: wall time and the tokens it generated and pushed through the teacher and the student.

:class:`MeteredTrainer` is :class:`gkd.trainer.GKDTrainer` with a meter on its data stream and its steps; nothing
in the step changes. After ``train()`` its :attr:`MeteredTrainer.cost` holds, over every step of the run:

* ``rollout_tokens``: completion tokens the student generated (the on-policy steps' completions, ``num_generations``
  per prompt included);
* ``student_tokens``: prompt + completion tokens of the student's training forward passes (every step);
* ``teacher_tokens``: prompt + completion tokens the teacher scored (steps whose objective needs the teacher; the
  teacher's own prompts where the data gives it some). A top-k cache in front of the teacher still counts them, and
  SeqKD's one-off target generation before the first step is not a step and is not counted;
* ``steps`` and ``train_s`` (the trainer's wall time, set by the caller with the evaluation's time).

The completion tokens of a step come from its log record (``completion_tokens``, counted after the rollout); the
prompt tokens from the batches the stream hands the step (prompts are the same before and after a rollout).
"""

from __future__ import annotations

from typing import Any

from gkd.trainer import GKDTrainer

__all__ = ["COST_KEYS", "MeteredTrainer"]

COST_KEYS = ("rollout_tokens", "student_tokens", "teacher_tokens", "steps")


class _CountingStream:
    """The run's batch stream, counting the prompt tokens (the student's and the teacher's) of each batch it hands out;
    everything else (``state_dict`` for checkpoints, ...) is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.prompt_tokens = 0
        self.teacher_prompt_tokens = 0

    def next(self) -> Any:
        batch = self._stream.next()
        self.prompt_tokens += int(batch.prompt_mask.sum())
        self.teacher_prompt_tokens += int(batch.teacher_prompt()[1].sum())
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class MeteredTrainer(GKDTrainer):
    """A :class:`GKDTrainer` that counts what each step cost (see the module docstring); read :attr:`cost`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cost: dict[str, int] = dict.fromkeys(COST_KEYS, 0)
        self._counter: _CountingStream | None = None

    def setup(self) -> Any:
        run = super().setup()
        if self._counter is None:
            self._counter = _CountingStream(run.stream)
            run.stream = self._counter
        return run

    def train_step(self) -> dict[str, Any]:
        run = self.setup()
        counter = self._counter
        assert counter is not None
        before = (counter.prompt_tokens, counter.teacher_prompt_tokens)
        record = super().train_step()
        prompts = counter.prompt_tokens - before[0]
        teacher_prompts = counter.teacher_prompt_tokens - before[1]
        completions = int(record["completion_tokens"])
        if record["on_policy"]:
            # each prompt is sampled num_generations times: the forward passes see it that often
            generations = max(1, int(getattr(run.cfg, "num_generations", 1) or 1))
            prompts, teacher_prompts = prompts * generations, teacher_prompts * generations
            self.cost["rollout_tokens"] += completions
        self.cost["student_tokens"] += prompts + completions
        if run.objective.needs_teacher and run.teacher is not None:
            self.cost["teacher_tokens"] += teacher_prompts + completions
        self.cost["steps"] += 1
        return record
