"""Built-in synthetic tasks: stand-ins for the GKD paper's benchmarks that train in minutes on a CPU.

| name            | stands in for | headline metric | what makes it interesting for distillation                   |
|-----------------|---------------|-----------------|--------------------------------------------------------------|
| `summarization` | XSum          | `set_match`     | free-order output; with `target_order: prompt` the fixed data come from another policy (where on-policy data matters) |
| `arithmetic`    | GSM8K         | `final_answer`  | several valid chains of thought, compounding errors          |
| `translation`   | WMT14         | `bleu`          | synonyms, reordering, long-range agreement                   |
| `instructions`  | FLAN → MMLU/BBH | `set_match`   | a mixture of instructions, some held out for evaluation      |

``get_task(name, **params)`` builds one; ``params`` are the task dataclass's fields (e.g. ``paraphrase_prob``).
Real datasets (GSM8K, XSum, WMT14) are mapped to the same record format by :mod:`gkd.tasks.adapters`.
"""

from __future__ import annotations

from gkd.tasks.arithmetic import ArithmeticCoT
from gkd.tasks.base import Task
from gkd.tasks.instructions import InstructionMixture
from gkd.tasks.summarization import SalientSetSummarization
from gkd.tasks.translation import SyntheticTranslation

TASKS: dict[str, type[Task]] = {
    SalientSetSummarization.name: SalientSetSummarization,
    ArithmeticCoT.name: ArithmeticCoT,
    SyntheticTranslation.name: SyntheticTranslation,
    InstructionMixture.name: InstructionMixture,
}


def get_task(name: str, **params) -> Task:
    """Instantiate a built-in task by name; raises ``ValueError`` listing the valid names."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**params)


__all__ = [
    "TASKS",
    "ArithmeticCoT",
    "InstructionMixture",
    "SalientSetSummarization",
    "SyntheticTranslation",
    "Task",
    "get_task",
]
