#!/usr/bin/env bash
# The paper's whole pipeline (Fan et al., AAAI 2025), PoFT and the SFT baseline side by side:
# score -> train (PoFT, SFT) -> DPO -> eval -> report. Run from the repository root on a machine with
# 8 GPUs (about 80 GB each) and network access to the Hugging Face Hub:
#
#   bash recipes/paper.sh            # everything
#   STAGES="eval report" bash recipes/paper.sh   # some stages only
#
# Every stage reads its recipe from recipes/ (flags after --config override it) and writes into data/ or
# outputs/. Scoring is cached per reference under $POFT_CACHE/scores, so an interrupted run resumes.
set -euo pipefail

STAGES=${STAGES:-"score train dpo eval report"}
GPUS=${GPUS:-8}
ZERO3="accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes $GPUS -m poft.cli"
run() { [[ " $STAGES " == *" $1 "* ]]; }

# 1. Score UltraChat200k with the three aligned references (zephyr-7b-sft-full, Llama-3-8B-Instruct,
#    Yi-6B-Chat): per reference, the mean log-prob of the response tokens in its own chat template;
#    ref_score is their mean. The processes share the uncached rows; the main one writes data/ultrachat200k-scored.
if run score; then
  accelerate launch --multi_gpu --num_processes "$GPUS" -m poft.cli score --config recipes/score-paper.yaml
  # optional, the paper's score filtering: keep the top 40% by ref_score
  # poft filter --data data/ultrachat200k-scored --by ref_score --top_fraction 0.4 --output data/ultrachat200k-top40
fi

# 2. Full fine-tuning of Mistral-7B-v0.1 under DeepSpeed ZeRO-3: PoFT, then the SFT baseline with
#    identical settings (only the objective and output_dir differ).
if run train; then
  $ZERO3 train --config recipes/train-mistral-7b-base.yaml
  $ZERO3 train --config recipes/train-mistral-7b-base.yaml --objective sft --output_dir outputs/mistral-7b-sft-ultrachat
fi

# 3. The second stage: DPO on UltraFeedback from each model.
if run dpo; then
  $ZERO3 dpo --config recipes/dpo-paper.yaml
  $ZERO3 dpo --config recipes/dpo-paper.yaml --model_name_or_path outputs/mistral-7b-sft-ultrachat \
    --output_dir outputs/mistral-7b-sft-dpo
fi

# 4. The Open LLM Leaderboard tasks (ARC 25-shot, HellaSwag 10-shot, TruthfulQA mc2, MMLU 5-shot,
#    Winogrande 5-shot, GSM8k 5-shot) through lm-eval-harness: pip install "poft[eval]".
if run eval; then
  poft eval --output outputs/paper-eval \
    --model outputs/mistral-7b-sft-ultrachat --model outputs/mistral-7b-poft-ultrachat \
    --model outputs/mistral-7b-sft-dpo --model outputs/mistral-7b-poft-dpo
fi

# 5. One report: the references' score distributions and agreement (the paper's Figure 2), a data audit,
#    training curves (loss, PoFT weight, win rate, margin) and the evaluation table.
if run report; then
  poft report --output outputs/paper-report --scored data/ultrachat200k-scored \
    --runs outputs/mistral-7b-poft-ultrachat --runs outputs/mistral-7b-sft-ultrachat \
    --eval outputs/paper-eval/eval_results.json
fi
