"""ComBat harmonisation by site (inva_pyro/data/harmonize.py), checked against known truth: features simulated
with per-site location and scale shifts and covariate effects, tolerances from the sample sizes."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest

from inva_pyro.data.cohort import Cohort
from inva_pyro.data.harmonize import ComBat
from inva_pyro.data.simulate import write_cohort
from inva_pyro.data.subset import Subset
from inva_pyro.errors import InputError

# neuroCombat under numpy 2 / pandas 3: any warning is a failure here.
pytestmark = pytest.mark.filterwarnings("error")

SITES = ("A", "B", "C")
SHIFT = {"A": 0.0, "B": 1.5, "C": -1.0}   # site location, in units of the feature's sd
GAIN = {"A": 1.0, "B": 1.8, "C": 0.6}     # site scale of the noise (sqrt(delta))
AGE = pd.Series({"A": 62.0, "B": 70.0, "C": 78.0})   # sites recruit at different ages: age and site overlap
V = 25
Z = 4.5   # tolerance in standard errors: V features x 3 site pairs per check


def truth(seed: int = 0) -> dict:
    """Per-feature mean, sd, covariate effects and per-site shifts and gains (feature-specific around SHIFT,
    GAIN)."""
    rng = np.random.default_rng([seed, 1])
    sd = rng.uniform(0.5, 1.5, V)
    return {"alpha": rng.normal(0, 1, V), "sd": sd, "age": rng.normal(0.05, 0.02, V),
            "male": rng.normal(0.5, 0.1, V),
            "shift": {s: sd * (SHIFT[s] + 0.15 * rng.standard_normal(V)) for s in SITES},
            "gain": {s: GAIN[s] * np.exp(0.1 * rng.standard_normal(V)) for s in SITES}}


def simulate(counts=(40, 60, 50), seed: int = 1, params: dict | None = None, prefix: str = "s") -> Subset:
    """Subjects of sites A, B, C (mean age AGE): x = alpha + age and sex effects + site shift + site gain * sd *
    noise."""
    params = truth() if params is None else params
    rng = np.random.default_rng([seed, 2])
    sites = np.repeat(SITES, counts)
    n = len(sites)
    age, male = rng.normal(AGE[sites], 5), rng.random(n) < 0.5
    x = params["alpha"] + (age - 70)[:, None] * params["age"] + male[:, None] * params["male"]
    for s in SITES:
        at = sites == s
        x[at] += params["shift"][s] + params["gain"][s] * params["sd"] * rng.standard_normal((at.sum(), V))
    subjects = [f"{prefix}{i:03d}" for i in range(n)]
    conditions = pd.DataFrame({"age": [f"{a:.2f}" for a in age], "sex": np.where(male, "M", "F")},
                              index=pd.Index(subjects, name="subject"))
    return Subset(subjects=subjects, inputs={"x": x.astype(np.float32)}, conditions=conditions,
                  sites=pd.Series(sites, index=conditions.index, name="site"))


def covariate_part(subset: Subset, params: dict) -> np.ndarray:
    age = pd.to_numeric(subset.conditions["age"]).to_numpy()
    male = (subset.conditions["sex"] == "M").to_numpy()
    return (age - 70)[:, None] * params["age"] + male[:, None] * params["male"]


def site_stats(subset: Subset, x: np.ndarray, params: dict) -> dict:
    """Per site: (n, mean, sd) per feature of x less its true covariate part."""
    r = x - covariate_part(subset, params)
    sites = subset.sites.to_numpy()
    return {s: (int((sites == s).sum()), r[sites == s].mean(0), r[sites == s].std(0, ddof=1)) for s in SITES}


def agree(stats: dict, other: dict | None = None) -> tuple[bool, bool]:
    """Whether every pair of sites (or each site of ``stats`` against each site of ``other``) agrees in mean
    and in sd per feature within Z standard errors of the difference."""
    other = stats if other is None else other
    pairs = [(s, t) for s in SITES for t in SITES if (s < t if other is stats else True)]
    means = sds = True
    for s, t in pairs:
        (n, m, sd), (n2, m2, sd2) = stats[s], other[t]
        pooled = np.sqrt(((n - 1) * sd ** 2 + (n2 - 1) * sd2 ** 2) / (n + n2 - 2))
        means &= bool(np.all(np.abs(m - m2) <= Z * pooled * np.sqrt(1 / n + 1 / n2)))
        sds &= bool(np.all(np.abs(np.log(sd / sd2)) <= Z * np.sqrt(1 / (2 * (n - 1)) + 1 / (2 * (n2 - 1)))))
    return means, sds


@pytest.fixture(scope="module")
def fitted():
    params = truth()
    train = simulate(params=params)
    return params, train, ComBat.fit(train, covariates=["age", "sex"])


def test_sites_share_one_location_and_scale_after_harmonising(fitted):
    params, train, combat = fitted
    assert agree(site_stats(train, train.inputs["x"], params)) == (False, False)   # the checks can fail
    harmonised = combat.transform(train)
    assert agree(site_stats(train, harmonised.inputs["x"], params)) == (True, True)
    assert harmonised.inputs["x"].dtype == np.float32
    assert harmonised.subjects == train.subjects and harmonised.conditions is train.conditions


def slope_errors(subset: Subset, x: np.ndarray, params: dict) -> np.ndarray:
    """(2, V): the age and sex effects of x fitted over all subjects, less the truth, in standard errors.
    After harmonising, the sites are one population: no site terms."""
    age = pd.to_numeric(subset.conditions["age"]).to_numpy()
    male = (subset.conditions["sex"] == "M").to_numpy().astype(float)
    design = np.column_stack([np.ones(len(x)), age - 70, male])
    coef, *_ = np.linalg.lstsq(design, x.astype(np.float64), rcond=None)
    resid_sd = np.sqrt(((x - design @ coef) ** 2).sum(0) / (len(x) - design.shape[1]))
    se = resid_sd[None, :] * np.sqrt(np.diag(np.linalg.inv(design.T @ design)))[-2:, None]
    return (coef[-2:] - np.stack([params["age"], params["male"]])) / se


def test_covariate_effects_are_kept(fitted):
    params, train, combat = fitted
    z = slope_errors(train, combat.transform(train).inputs["x"], params)
    assert np.all(np.abs(z) <= Z) and np.all(np.abs(z.mean(axis=1)) <= Z / np.sqrt(V))
    # Age differs between sites: unprotected, ComBat takes the between-site part of its effect away.
    unprotected = slope_errors(train, ComBat.fit(train).transform(train).inputs["x"], params)
    assert unprotected[0].mean() < -Z / np.sqrt(V)


def test_reproduces_neurocombat_on_the_fitted_subjects(fitted):
    from neuroCombat import neuroCombat

    _, train, combat = fitted
    covars = pd.DataFrame({"site": train.sites.to_numpy(dtype=object),
                           "age": pd.to_numeric(train.conditions["age"]).to_numpy(), "sex": train.conditions["sex"]})
    with contextlib.redirect_stdout(io.StringIO()):
        expected = neuroCombat(train.inputs["x"].astype(np.float64).T, covars, "site", categorical_cols=["sex"],
                               continuous_cols=["age"])["data"].T
    np.testing.assert_allclose(combat.transform(train).inputs["x"], expected, rtol=1e-5, atol=1e-5)


def test_held_out_subjects_come_out_on_the_training_scale(fitted):
    params, train, combat = fitted
    new = simulate(counts=(15, 20, 25), seed=7, params=params, prefix="new")
    reference = site_stats(train, combat.transform(train).inputs["x"], params)
    assert agree(site_stats(new, new.inputs["x"], params), reference) == (False, False)
    assert agree(site_stats(new, combat.transform(new).inputs["x"], params), reference) == (True, True)


def test_neurocombat_options(fitted):
    params, train, _ = fitted
    plain = ComBat.fit(train, ["age", "sex"], eb=False)   # per-site estimates, no shrinkage
    assert plain.options == {"eb": False, "parametric": True, "mean_only": False}
    assert agree(site_stats(train, plain.transform(train).inputs["x"], params)) == (True, True)
    shifted = ComBat.fit(train, ["age", "sex"], mean_only=True).transform(train).inputs["x"]
    for s in SITES:   # locations only: each site's spread is kept
        at = (train.sites == s).to_numpy()
        np.testing.assert_allclose(shifted[at].std(0), train.inputs["x"][at].std(0), rtol=1e-4)


def test_own_covariates_or_the_training_average(fitted):
    _, train, combat = fitted
    changed = train.conditions.copy()
    changed["age"] = "90.00"
    moved = Subset(**{**train.__dict__, "conditions": changed})
    average = combat.transform(train, own_covariates=False).inputs["x"]
    np.testing.assert_array_equal(combat.transform(moved, own_covariates=False).inputs["x"], average)
    assert not np.allclose(combat.transform(moved).inputs["x"], combat.transform(train).inputs["x"])
    plain = ComBat.fit(train)   # no covariates: both ways agree
    np.testing.assert_array_equal(plain.transform(train).inputs["x"],
                                  plain.transform(train, own_covariates=False).inputs["x"])


def test_rows_of_nan_stay_nan_and_are_left_out_of_the_fit(fitted):
    _, train, _ = fitted
    x = train.inputs["x"].copy()
    gone = np.array([0, 5, 70, 120])
    x[gone] = np.nan
    subset = Subset(**{**train.__dict__, "inputs": {"x": x, "w": train.inputs["x"][:, :5] * 2}})
    out = ComBat.fit(subset, ["age", "sex"]).transform(subset)
    assert np.isnan(out.inputs["x"][gone]).all() and not np.isnan(np.delete(out.inputs["x"], gone, 0)).any()
    keep = np.setdiff1d(np.arange(len(x)), gone)
    alone = train.subset(keep)
    np.testing.assert_allclose(out.inputs["x"][keep], ComBat.fit(alone, ["age", "sex"]).transform(alone)
                               .inputs["x"], rtol=1e-6, atol=1e-6)


def test_features_constant_within_a_site_are_left_as_they_are(fitted):
    _, train, _ = fitted
    x = train.inputs["x"]
    constant = np.zeros((len(x), 2), np.float32)
    constant[train.sites.to_numpy() == "B", 1] = 3.0   # varies across sites, constant within each
    with_constant = Subset(**{**train.__dict__, "inputs": {"x": np.concatenate([constant, x], axis=1)}})
    out = ComBat.fit(with_constant, ["age", "sex"]).transform(with_constant).inputs["x"]
    np.testing.assert_array_equal(out[:, :2], constant)
    np.testing.assert_allclose(out[:, 2:], ComBat.fit(train, ["age", "sex"]).transform(train).inputs["x"],
                               rtol=1e-6, atol=1e-6)


def test_a_single_feature_is_harmonised_without_empirical_bayes(fitted):
    params, train, _ = fitted
    single = Subset(**{**train.__dict__, "inputs": {"x": train.inputs["x"][:, 3:4]}})
    combat = ComBat.fit(single, ["age", "sex"])
    assert combat.images["x"]["eb"] is False
    plain = ComBat.fit(train, ["age", "sex"], eb=False).transform(train).inputs["x"][:, 3:4]
    np.testing.assert_allclose(combat.transform(single).inputs["x"], plain, rtol=1e-6, atol=1e-6)


def test_empty_covariate_cells_are_filled_with_the_fit_mean_or_most_frequent_level(fitted):
    _, train, _ = fitted
    conditions = train.conditions.copy()
    conditions.iloc[[3, 50], 0] = np.nan
    conditions.iloc[[4, 90], 1] = np.nan
    gappy = Subset(**{**train.__dict__, "conditions": conditions})
    combat = ComBat.fit(gappy, ["age", "sex"])
    filled = conditions.copy()
    filled.iloc[[3, 50], 0] = repr(float(pd.to_numeric(conditions["age"]).mean()))
    filled.iloc[[4, 90], 1] = conditions["sex"].value_counts().idxmax()
    np.testing.assert_array_equal(combat.transform(gappy).inputs["x"],
                                  combat.transform(Subset(**{**train.__dict__, "conditions": filled})).inputs["x"])
    assert gappy.conditions["age"].isna().sum() == 2   # the subset's own cells are left empty


def test_round_trip_through_json_gives_identical_output(fitted):
    _, train, combat = fitted
    stored = json.loads(json.dumps(combat.to_dict()))
    again = ComBat.from_dict(stored)
    np.testing.assert_array_equal(again.transform(train).inputs["x"], combat.transform(train).inputs["x"])
    new = simulate(counts=(3, 4, 5), seed=9)
    np.testing.assert_array_equal(again.transform(new).inputs["x"], combat.transform(new).inputs["x"])


def _with(subset: Subset, **changes) -> Subset:
    return Subset(**{**subset.__dict__, **changes})


def test_errors_are_one_line_and_name_the_problem(fitted):
    _, train, combat = fitted
    lonely = train.sites.copy()
    lonely.iloc[0] = "D"
    confounded = train.conditions.assign(sex=np.where(train.sites == "A", "M", "F"))
    unseen_level = train.conditions.assign(sex="X")
    cases = [
        (lambda: ComBat.fit(_with(train, sites=None)), "without sites"),
        (lambda: ComBat.fit(_with(train, sites=lonely)), "site 'D' has 1 subject(s) with input 'x'"),
        (lambda: ComBat.fit(train, ["age", "bmi"]), "no covariate column 'bmi'"),
        (lambda: ComBat.fit(_with(train, conditions=confounded), ["sex"]), "confounded with site"),
        (lambda: combat.transform(_with(train, sites=lonely)), "site 'D' (column 'site') was not among the sites"),
        (lambda: combat.transform(_with(train, conditions=unseen_level)), "level the fit never saw"),
        (lambda: combat.transform(_with(train, conditions=None)), "no covariate column 'age'"),
        (lambda: ComBat().transform(train), "nothing fitted"),
    ]
    for call, expected in cases:
        with pytest.raises(InputError) as error:
            call()
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_simulated_multisite_cohort_loses_most_of_its_site_differences(tmp_path):
    folder = write_cohort(tmp_path / "cohort", "multisite", 80, 0, sites=3)
    subset = Cohort.from_dir(folder, conditions=["age", "sex", "apoe4"], site="site").all
    harmonised = ComBat.fit(subset, covariates=["age", "sex", "apoe4"]).transform(subset)
    sites = subset.sites.to_numpy()

    def spread(x):   # root mean square over sites and features of a site's mean less the overall mean
        means = np.stack([x[sites == s].mean(0) for s in np.unique(sites)])
        return float(np.sqrt(((means - x.mean(0)) ** 2).mean()))

    for name, x in subset.inputs.items():
        assert spread(harmonised.inputs[name]) < 0.4 * spread(x), name
