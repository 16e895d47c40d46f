"""Datasets: reading records, turning them into token ids, and batching them.

Records use TRL's formats:
- ``{"prompt": str, "completion": str}`` (the completion is the target);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the chat template renders everything before the last
  assistant turn as the prompt, and that last turn is the target;
- ``{"prompt": [messages], "completion": [assistant messages]}`` (TRL's conversational prompt-completion, the
  DistillationTrainer's format): the prompt messages through the chat template, the assistant content the target,
  the same ids as the equivalent ``messages`` record;
- ``{"prompt": str}`` or ``{"prompt": [messages]}`` alone (or ``messages`` ending with a user turn) is a prompt-only
  record, usable when every batch is the student's own samples (λ = 1) or the teacher writes the targets (SeqKD).
Chat prompts always get the chat template with the generation prompt; plain-string prompts only with
``apply_chat_template`` (as one user turn). Extra fields (e.g. ``references``) are kept for metrics and rewards.

Loss and metrics only ever see completion tokens. Prompts longer than ``max_prompt_length`` are truncated from the
left and counted, never silently dropped.

The package, one job a file (bottom to top; each imports only the ones above it):

- :mod:`gkd.data.records`: reading records (JSONL, JSON, CSV, Parquet, a folder, a saved dataset, the hub);
- :mod:`gkd.data.tokenize`: record formats and chat templates; records -> :class:`Example` -> :class:`TokenizedDataset`;
- :mod:`gkd.data.arrow`: data at scale: the ``datasets.map`` cache, one shard per process, streamed prompts;
- :mod:`gkd.data.batch`: :class:`Batch` (padding, :func:`collate`) and the run's batch streams.

Every name is importable from ``gkd.data`` itself.
"""

from __future__ import annotations

from gkd.data.arrow import (
    COMPLETION_IDS,
    PROMPT_IDS,
    ArrowExamples,
    ArrowTokenizedDataset,
    StreamingDataset,
    check_streaming,
    load_with_datasets,
    main_process_first,
    map_tokenize,
    open_dataset,
    process_position,
    read_with_datasets,
    tokenize_dataset,
    tokenizer_fingerprint,
)
from gkd.data.batch import (
    Batch,
    BatchStream,
    PromptStream,
    collate,
    make_stream,
    pad_left,
    pad_right,
    select_rows,
    token_groups,
)
from gkd.data.records import (
    load_records,
    read_jsonl,
)
from gkd.data.tokenize import (
    Example,
    TeacherPrompt,
    TokenizedDataset,
    check_apply_chat_template,
    message_text,
    read_chat_template,
    split_record,
    teacher_prompt_text,
    tokenize_records,
    with_chat_template,
)

__all__ = [
    "COMPLETION_IDS",
    "PROMPT_IDS",
    "ArrowExamples",
    "ArrowTokenizedDataset",
    "Batch",
    "BatchStream",
    "Example",
    "PromptStream",
    "StreamingDataset",
    "TeacherPrompt",
    "TokenizedDataset",
    "check_apply_chat_template",
    "check_streaming",
    "collate",
    "load_records",
    "load_with_datasets",
    "main_process_first",
    "make_stream",
    "map_tokenize",
    "message_text",
    "open_dataset",
    "pad_left",
    "pad_right",
    "process_position",
    "read_chat_template",
    "read_jsonl",
    "read_with_datasets",
    "select_rows",
    "split_record",
    "teacher_prompt_text",
    "token_groups",
    "tokenize_dataset",
    "tokenize_records",
    "tokenizer_fingerprint",
    "with_chat_template",
]
