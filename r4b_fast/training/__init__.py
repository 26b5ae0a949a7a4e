"""Training loops: bi-mode annealing and BPO (``python -m r4b_fast.training.bpo``)."""
