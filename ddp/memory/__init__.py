"""Memory probes that size the batch (``data.batch_size: auto``).

readers   how much memory is free and what a step peaked at: CUDA and CPU behind one interface
estimate  the analytic table: parameters, gradients, optimizer state, activations per sample
policy    the search as pure functions: affine fit, prediction, back-off (no device, no torch)
probe     real trial steps on one rank's unwrapped model; state restored afterwards
agree     one collective: every rank takes the smallest verified size, or every rank stops
resolve   the session's entry point: cache, resume, probe, agree, memory_probe.json
"""
