"""What a run tells its user: logging, metrics (console, metrics.jsonl, wandb), the start and dry-run
report, and pipeline timing."""
