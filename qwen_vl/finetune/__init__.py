"""Fine-tuning: data, adapters, training loop, checkpoints."""
