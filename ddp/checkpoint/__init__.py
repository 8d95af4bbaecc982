"""What a checkpoint is on disk and who writes and reads it: atomic files, manifests, resume."""
