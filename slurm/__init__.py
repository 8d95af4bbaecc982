"""Slurm: submission through submitit with requeue on preemption, and a one-machine test cluster.

``python -m slurm.submit``   check a request against ``sinfo`` and submit a recipe or a program
``slurm.job``               what every task runs (submitit ``Checkpointable``; requeue on USR2)
``python -m slurm.testbed`` a real single-node Slurm from Debian packages, for tests and trying it
``slurm/train.sbatch``      plain ``sbatch`` + ``srun`` + ``torchrun`` for people who keep job scripts
"""
