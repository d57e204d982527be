"""Stage 1, the data: cohort manifests and image files read into feature matrices, image spaces (volumes,
surfaces, region tables), streaming from disk, standardisation, and simulated cohorts with known truth.
"""
