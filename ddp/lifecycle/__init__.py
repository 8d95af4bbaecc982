"""A run's lifecycle: which directory a run writes, whether it resumes, what changed since.

    runs/<name>/                    the run group (``run.dir`` overrides it)
      version_0/  version_1/ ...    one directory per training run, never shared
        recipe.yaml                 what this run trains with now, with its history as comments
        history.jsonl               one record per start, resume (step, changes) or stop on a signal
        metrics.jsonl, tensorboard/, checkpoints/, logs/

Rank 0 decides (``decision.decide``) after the process group forms and tells the other ranks,
so every rank writes into the same version and a refusal is said once and writes nothing.
"""
