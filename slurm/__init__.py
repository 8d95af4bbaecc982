"""Slurm submission through submitit (``python -m slurm.submit``): not built yet.

Inside a Slurm job, ``ddp.environment.SlurmEnv`` already reads srun's rank variables, so
``srun python -m ddp.train`` works today; submission and requeue come with their own issue.
"""
