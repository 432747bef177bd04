"""poft: Preference-Oriented Supervised Fine-Tuning on Hugging Face TRL.

The pipeline, one module a stage: `data` (load SFT data) -> `scoring` (reference scores) -> `noise` /
`filtering` -> `trainer` (PoFT or the SFT baseline) -> `dpo` -> `evaluation` -> `report`. `chat` and
`objectives` hold the one definition of a score that scoring and training share.

The public names are imported on first use (a module `__getattr__`, as TRL's `_LazyModule` does), so that
`import poft` and `poft --help` do not load torch, transformers and TRL.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "ConversationEncoder": "poft.chat",
    "EncodedConversation": "poft.chat",
    "load_sft_dataset": "poft.data",
    "load_preference_dataset": "poft.dpo",
    "CacheError": "poft.errors",
    "ChatTemplateError": "poft.errors",
    "DataError": "poft.errors",
    "DependencyError": "poft.errors",
    "ModelError": "poft.errors",
    "OptionError": "poft.errors",
    "OutputError": "poft.errors",
    "PoftError": "poft.errors",
    "ScoringError": "poft.errors",
    "exact_match_accuracy": "poft.evaluation",
    "heldout_log_likelihood": "poft.evaluation",
    "filter_by_score": "poft.filtering",
    "ifd_scores": "poft.filtering",
    "add_noise": "poft.noise",
    "nll_loss": "poft.objectives",
    "poft_loss": "poft.objectives",
    "poft_margins": "poft.objectives",
    "poft_weights": "poft.objectives",
    "sequence_mean_log_probs": "poft.objectives",
    "ScoreConfig": "poft.scoring",
    "ScoringOptions": "poft.scoring",
    "model_scores": "poft.batching",
    "score_dataset": "poft.scoring",
    "PoFTConfig": "poft.trainer",
    "PoFTTrainer": "poft.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import a public name's module on first access and keep the name, so later lookups skip this."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
