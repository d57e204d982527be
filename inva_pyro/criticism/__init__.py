"""Stage 5, criticism: metrics, posterior-collapse and Pareto-k diagnostics, ArviZ data for posterior predictive
checks, evaluation reports, figures, latent-space analysis and reference baselines.
"""
