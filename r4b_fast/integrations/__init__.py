"""BPO and the ops inside other trainers, through their extension points (optional imports).

- ``r4b_fast.integrations.trl``: TRL's ``GRPOTrainer`` (``pip install r4b_fast[trl]``).
- ``r4b_fast.integrations.verl``: verl's advantage-estimator and policy-loss registries (``[verl]``).

Importing this package imports neither trainer.
"""
