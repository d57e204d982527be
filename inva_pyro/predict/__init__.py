"""Stage 4, prediction: streamed posterior predictive sampling, recalibration on validation subjects, and the
``Prediction`` object that carries the maps back to files.
"""
