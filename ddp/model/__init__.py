"""Building the model (built-ins and your own), fine-tuning, parallel wrappers, precision, optimizers."""
