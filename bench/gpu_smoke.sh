#!/usr/bin/env bash
# One-GPU smoke test and figures (no network; torch + transformers preinstalled): random-weight
# Qwen2.5-1.5B architecture (bench/qwen2.5-1.5b/config.json), 64 prompts x 8 rollouts, 1,024 new tokens.
# Prints rollout tokens/s (ours vs plain generate), time per phase, update tokens/s and MFU, peak memory.
# Budget: under 8 minutes.   bash bench/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -c "import math_verify" 2>/dev/null || echo "math-verify missing: rewards will all be 0 (timing unaffected)"
ATTN=sdpa; python -c "import flash_attn" 2>/dev/null && ATTN=flash_attention_2
CACHE=dynamic; [ "$ATTN" = flash_attention_2 ] && CACHE=paged  # configs/1.5b.yaml's paged cache needs flash-attention
MODEL=/tmp/rand-qwen2.5-1.5b
python -c "import sys; sys.path.insert(0, 'bench'); from step import random_model; \
print('parameters', random_model('bench/qwen2.5-1.5b/config.json', '$MODEL'))"
echo "== rollout: rollout.generate vs plain generate (64 prompts x 4, 512 new tokens)"
timeout 100 python bench/rollout.py --model $MODEL --prompts 64 --n 4 --max-new-tokens 512 --max-batch-tokens 600000
echo "== rollout with rollout.cache=static (compiled decoding; first batches pay the compilation)"
timeout 50 python bench/rollout.py --model $MODEL --prompts 32 --n 4 --max-new-tokens 256 --max-batch-tokens 600000 --cache static
echo "== rollout with rollout.cache=paged (continuous batching, generate_batch; includes its warm-up)"
timeout 50 python bench/rollout.py --model $MODEL --prompts 32 --n 4 --max-new-tokens 256 --max-batch-tokens 600000 --cache paged
echo "== full steps (64 prompts x 8 rollouts, 1024 new tokens, attn=$ATTN, cache=$CACHE)"
timeout 250 python bench/step.py --config configs/1.5b.yaml --model-dir $MODEL --steps 2 -- \
  --model.attn_implementation=$ATTN --rollout.cache=$CACHE --data.train=data/benchmarks/math500/test.jsonl --data.num_subsets=1 \
  --data.max_prompts=64 --cures.cold_start_rollouts=2 --rollout.prompts_per_step=64 --rollout.rollouts_per_step=512 \
  --rollout.max_new_tokens=1024 --rollout.max_batch_tokens=600000 --train.mini_batch_prompts=64 \
  --train.steps_per_subset=2 --train.micro_batch_tokens=32768 --run.reward_workers=8 --model.gradient_checkpointing=true
echo "decode bound for reference: about 81k tokens/s for Qwen2.5-1.5B at batch 256, context 1024 on an H100 (issue 7)"
