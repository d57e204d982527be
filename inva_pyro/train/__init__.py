"""Stage 3, training: the SVI loop (minibatch plates, annealing, early stopping, checkpoints) and its
multi-process (torch.distributed) variant.
"""
