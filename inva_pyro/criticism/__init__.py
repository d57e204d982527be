"""Stage 5, criticism: metrics, posterior-collapse and Pareto-k diagnostics, ArviZ data for posterior predictive
checks, evaluation reports, figures, latent-space analysis and novelty scores (the peer models that serve as
baselines live in ``peers``).
"""
