"""What a run leaves in ``output_dir``: the final model, saved as TRL's ``trainer.save_model`` saves it (with
``load_best_model_at_end``, the best evaluated one loaded back from its checkpoint), and its upload to the hub.

``load_best_model_at_end``: a checkpoint is saved at every evaluation (whatever ``save_steps`` says; transformers
instead refuses save and eval cadences that do not line up), the best one by ``metric_for_best_model`` is never
removed by ``save_total_limit``, and at the end its weights are loaded back into the student, which is then saved as
the final model. The last checkpoint (``checkpoint-<last step>``) still holds the last state, for resuming.

:class:`gkd.trainer.GKDTrainer` calls these at the end of ``train()`` and from ``save_model()`` / ``push_to_hub()``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gkd import checkpoint as ckpt
from gkd.config import GKDConfig
from gkd.errors import GKDError
from gkd.run import Run
from gkd.state import BestMetric, TrainState

__all__ = ["hub_repo", "load_best", "push_to_hub", "save"]


def load_best(run: Run, st: TrainState, best: BestMetric | None, log: Callable[[str], None]) -> None:
    """``load_best_model_at_end``: the best checkpoint's weights into the student (before the final model is
    saved); one line naming the step and the value."""
    what = f"{best.name}={st.best_metric:.4g}" if best is not None and st.best_metric is not None else "best"
    if st.best_checkpoint is None or st.best_step is None:
        log(
            "warning: load_best_model_at_end: no evaluation was saved as a checkpoint; the final model is the "
            "last one"
        )
        return
    if st.best_step == st.step:
        log(f"best model: the last one, step {st.step} ({what})")
        return
    folder = run.output_dir / st.best_checkpoint
    if not ckpt.is_complete(folder):
        log(
            f"warning: load_best_model_at_end: the best checkpoint '{folder}' is gone; the final model is the "
            "last one"
        )
        return
    run.accelerator.wait_for_everyone()
    ckpt.load_model_weights(run.student, folder)
    log(f"best model: step {st.best_step} ({what}), loaded from {folder}")


def save(
    run: Run,
    cfg: GKDConfig,
    st: TrainState,
    best: BestMetric | None,
    output_dir: str | os.PathLike | None = None,
) -> Path:
    """The student as it is now and the tokenizer in ``output_dir`` (default: the run's), see
    :meth:`gkd.trainer.GKDTrainer.save_model`; every process takes part, the main one writes."""
    out = run.output_dir if output_dir is None else Path(os.path.expanduser(os.fspath(output_dir)))
    weights = "merged" if cfg.merge_lora and cfg.lora is not None else "adapter" if cfg.lora else "full"
    info: dict[str, Any] = {"step": st.step, "weights": weights}
    if cfg.load_best_model_at_end and st.best_checkpoint is not None:
        info.update(
            best_checkpoint=st.best_checkpoint,
            best_global_step=st.best_step,
            metric_for_best_model=best.name if best is not None else None,
            best_metric=st.best_metric,
        )
    run.accelerator.wait_for_everyone()
    if run.dist.is_main:
        ckpt.save_final_model(
            out, model=run.student, tokenizer=run.tokenizer, merged=cfg.merge_lora, info=info
        )
    run.accelerator.wait_for_everyone()
    return out


def hub_repo(run: Run, cfg: GKDConfig, before_training: bool = False) -> str | None:
    """Create (or find) the hub repo ``hub_model_id`` (main process only); returns its id. Called before training
    with ``push_to_hub``, so a missing token, no network or no permission stops the run at once."""
    import huggingface_hub

    if not run.dist.is_main:
        return None
    repo_id = cfg.hub_model_id or run.output_dir.resolve().name
    if not before_training:
        url = huggingface_hub.HfApi().create_repo(
            repo_id, private=cfg.hub_private_repo, exist_ok=True, token=cfg.hub_token
        )
        return getattr(url, "repo_id", None) or repo_id
    try:
        url = huggingface_hub.HfApi().create_repo(
            repo_id, private=cfg.hub_private_repo, exist_ok=True, token=cfg.hub_token
        )
    except Exception as e:  # no token, no network, no permission
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise GKDError(
            f"push_to_hub: the hub repo '{repo_id}' cannot be created or reached ({type(e).__name__}"
            f"{': ' + reason if reason else ''}); log in (hf auth login, HF_TOKEN or hub_token), check the "
            "network, or set push_to_hub: false. Nothing was trained"
        ) from e
    return getattr(url, "repo_id", None) or repo_id


def push_to_hub(
    run: Run, cfg: GKDConfig, step: int, created: tuple[Any, Any] | None, log: Callable[[str], None]
) -> str | None:
    """The final model's files in ``output_dir`` uploaded to the hub repo, see
    :meth:`gkd.trainer.GKDTrainer.push_to_hub`; ``created``: (``hub_model_id``, repo id) of the repo
    :func:`hub_repo` made before training, if it did."""
    import huggingface_hub

    if not run.dist.is_main:
        return None
    repo_id = cfg.hub_model_id or run.output_dir.resolve().name
    files = ckpt.final_model_files(run.output_dir)
    if not files:
        raise GKDError(f"push_to_hub: '{run.output_dir}' holds no final model yet; call save_model() first")
    try:
        api = huggingface_hub.HfApi()
        # made before training, for this hub_model_id
        repo_id = created[1] if created and created[0] == cfg.hub_model_id else hub_repo(run, cfg)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(run.output_dir),
            allow_patterns=[glob.escape(f) for f in files],
            commit_message=f"gkd: final model (step {step})",
            token=cfg.hub_token,
        )
    except Exception as e:  # no token, no network, no permission: the local model is what matters
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise GKDError(
            f"push_to_hub: uploading to '{repo_id}' failed ({type(e).__name__}{': ' + reason if reason else ''}); "
            f"the final model is saved in '{run.output_dir}'"
        ) from e
    log(f"pushed the final model to the hub: {repo_id}")
    return repo_id
