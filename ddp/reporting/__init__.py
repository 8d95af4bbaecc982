"""What a run tells its user: rank-aware logs, metrics.jsonl and TensorBoard, the run report."""
