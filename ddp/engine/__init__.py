"""The training loop: steps, evaluation, agreed stop signals, seeding and RNG state."""
