"""Training: the loop, checkpoints, metrics and MLflow tracking."""
