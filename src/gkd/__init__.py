"""gkd: on-policy distillation of language models (Generalized Knowledge Distillation, Agarwal et al., ICLR 2024).

    from gkd import GKDConfig, GKDTrainer
    GKDTrainer(GKDConfig(model_name_or_path=..., teacher_model_name_or_path=..., dataset=..., lmbda=1.0)).train()

Layers, bottom to top: ``divergences`` (pure math) -> ``losses`` (chunked fused loss) -> ``models``, ``data``,
``sampling``, ``teacher``, ``rl``, ``tasks`` -> ``trainer`` -> ``experiments``, ``cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GKDConfig", "GKDTrainer", "__version__"]

if TYPE_CHECKING:
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import gkd` (and `gkd.divergences`) free of transformers start-up cost.
    if name == "GKDConfig":
        from gkd.config import GKDConfig

        return GKDConfig
    if name == "GKDTrainer":
        from gkd.trainer import GKDTrainer

        return GKDTrainer
    raise AttributeError(name)
