"""Reference models fitted on the same subjects as InVA."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV

from ..data.cohort import Subset


def ridge_predict(train: Subset, test: Subset, input_names: list[str]) -> np.ndarray:
    """Multi-output ridge regression of the outcome on all inputs concatenated (penalty by LOO-CV)."""
    x_train = np.concatenate([train.inputs[n] for n in input_names], axis=1)
    x_test = np.concatenate([test.inputs[n] for n in input_names], axis=1)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    ridge = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit((x_train - mu) / sd, train.outcome)
    return ridge.predict((x_test - mu) / sd)
