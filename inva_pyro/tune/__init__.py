"""Above the pipeline: hyperparameter search (Optuna) over whole fits, declared search space, study figures.
"""
