"""The machinery around train.py's Algorithm 1, one module per concern. None of them imports train.py.

    config.py       the typed Config (the single source of truth), YAML and --key=value loading, validation
    data.py         training sources -> the T subsets of Algorithm 1, gold answers, malformed-row errors
    distributed.py  process group set-up, print0, the few collectives, agreeing on a stop request, leaving
    models.py       the Policy (HF model + chunked log-prob head), FSDP2 sharding, generation weights
    batching.py     a mini-batch's sequences packed into micro-batches (padded, packed, shared-prompt)
    checkpoint.py   checkpoints (sharded save/load), resume and its config checks, the out_dir guard, HF export
    metrics.py      metrics.jsonl / wandb / tensorboard, phase timers, the curriculum's mechanism metrics
"""
