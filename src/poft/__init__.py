"""poft: Preference-Oriented Supervised Fine-Tuning on Hugging Face TRL.

The pipeline, one module a stage: `data` (load SFT data) -> `scoring` (reference scores) -> `trainer`
(PoFT or the SFT baseline). `chat` and `objectives` hold the one definition of a score that scoring
and training share.
"""

from poft.chat import ChatTemplateError, ConversationEncoder, EncodedConversation
from poft.data import DataError, load_sft_dataset
from poft.objectives import nll_loss, poft_loss, poft_margins, poft_weights, sequence_mean_log_probs
from poft.scoring import ScoreConfig, ScoringError, score_dataset
from poft.trainer import PoFTConfig, PoFTTrainer

__version__ = "0.1.0"

__all__ = [
    "ChatTemplateError",
    "ConversationEncoder",
    "DataError",
    "EncodedConversation",
    "PoFTConfig",
    "PoFTTrainer",
    "ScoreConfig",
    "ScoringError",
    "load_sft_dataset",
    "nll_loss",
    "poft_loss",
    "poft_margins",
    "poft_weights",
    "score_dataset",
    "sequence_mean_log_probs",
]
