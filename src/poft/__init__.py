"""poft: Preference-Oriented Supervised Fine-Tuning on Hugging Face TRL.

The pipeline, one module a stage: `data` (load SFT data) -> `scoring` (reference scores) -> `noise` /
`filtering` -> `trainer` (PoFT or the SFT baseline) -> `dpo` -> `evaluation` -> `report`. `chat` and
`objectives` hold the one definition of a score that scoring and training share.
"""

from poft.chat import ConversationEncoder, EncodedConversation
from poft.data import load_sft_dataset
from poft.dpo import load_preference_dataset
from poft.errors import (
    CacheError,
    ChatTemplateError,
    DataError,
    ModelError,
    OptionError,
    OutputError,
    PoftError,
    ScoringError,
)
from poft.evaluation import exact_match_accuracy, heldout_log_likelihood
from poft.filtering import filter_by_score, ifd_scores
from poft.noise import add_noise
from poft.objectives import nll_loss, poft_loss, poft_margins, poft_weights, sequence_mean_log_probs
from poft.scoring import ScoreConfig, ScoringOptions, score_dataset
from poft.trainer import PoFTConfig, PoFTTrainer

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "ChatTemplateError",
    "ConversationEncoder",
    "DataError",
    "EncodedConversation",
    "ModelError",
    "OptionError",
    "OutputError",
    "PoftError",
    "PoFTConfig",
    "PoFTTrainer",
    "add_noise",
    "exact_match_accuracy",
    "filter_by_score",
    "heldout_log_likelihood",
    "ifd_scores",
    "load_preference_dataset",
    "ScoreConfig",
    "ScoringError",
    "ScoringOptions",
    "load_sft_dataset",
    "nll_loss",
    "poft_loss",
    "poft_margins",
    "poft_weights",
    "score_dataset",
    "sequence_mean_log_probs",
]
