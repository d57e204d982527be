"""Site intensities: each site's inputs brought to one scale by a gain and a smooth offset field."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from inva_pyro.data.cohort import Cohort
from inva_pyro.data.site_intensity import MIN_SUBJECTS, SiteIntensity, monomials
from inva_pyro.data.spaces.volume import VolumeSpace
from inva_pyro.data.subset import Subset
from inva_pyro.errors import InputError

GRID = (9, 8, 1)
SPACE = VolumeSpace(GRID, np.diag([2.0, 2.0, 2.0, 1.0]), None, np.ones(GRID, dtype=bool))


def _scanner(x, gain, coefficients):
    """x as a scanner renders it: times ``gain``, plus a cubic offset field with these coefficients."""
    basis = monomials(SPACE.feature_coordinates(), x.shape[1], 3)
    return gain * x + basis @ np.asarray(coefficients)


def _sites(n=40, seed=0, scanners=((1.0, 0.0), (1.6, 0.4), (0.7, -0.3))):
    """The same n subjects' images ``x`` (n, 72) measured at each site of ``scanners`` (gain, field scale)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SPACE.n_features)) + 3.0
    inputs, labels = [], []
    for s, (gain, scale) in enumerate(scanners):
        coefficients = scale * rng.standard_normal(10)   # 10 monomials of degree <= 3 in 2 varying coordinates
        inputs.append(_scanner(x, gain, coefficients))
        labels += [f"S{s + 1}"] * n
    subset = Subset(subjects=[f"sub-{i}" for i in range(len(labels))], inputs={"gm": np.concatenate(inputs)},
                    spaces={"gm": SPACE}, sites=pd.Series(labels, name="site"))
    return subset, x


def test_the_same_subjects_measured_at_different_scanners_come_out_the_same():
    subset, x = _sites()
    harmoniser = SiteIntensity.fit(subset)
    out = harmoniser.transform("gm", subset.inputs["gm"], subset.sites).reshape(3, len(x), -1)
    # a gain and a cubic field are exactly what the harmoniser undoes: one image per subject again
    np.testing.assert_allclose(out[1], out[0], atol=1e-4)
    np.testing.assert_allclose(out[2], out[0], atol=1e-4)
    # on the reference scale: the gains' geometric mean over the (equal-sized) sites
    gains = np.array([harmoniser.sites[s]["gm"]["gain"] for s in ("S1", "S2", "S3")])
    np.testing.assert_allclose(gains / np.exp(np.log(gains).mean()), [1.0, 1.6, 0.7] / np.exp(np.log([1.0, 1.6, 0.7]).mean()),
                               rtol=1e-6)
    # and the harmonised images are the subjects' own up to one gain and one field: their anatomy is kept
    residual = out[0] - x / gains[0]   # S1 renders x as it is
    np.testing.assert_allclose(residual, np.broadcast_to(residual.mean(0), residual.shape), atol=1e-4)


def test_a_new_site_is_harmonised_from_its_own_images_and_unknown_sites_are_left_pooled():
    subset, x = _sites()
    harmoniser = SiteIntensity.fit(subset.subset(np.arange(80)))  # sites S1, S2
    new = subset.subset(np.arange(80, 120))                        # S3's subjects, a scanner never seen
    assert "S3" not in harmoniser.sites
    np.testing.assert_array_equal(harmoniser.transform("gm", new.inputs["gm"], new.sites),
                                  new.inputs["gm"].astype(np.float32))
    adapted = harmoniser.with_new_sites(new)
    assert set(adapted.sites) == {"S1", "S2", "S3"} and "S3" not in harmoniser.sites   # a copy
    reference = harmoniser.transform("gm", subset.inputs["gm"][:40], subset.sites[:40])
    np.testing.assert_allclose(adapted.transform("gm", new.inputs["gm"], new.sites), reference, atol=1e-4)
    # a site with fewer subjects than MIN_SUBJECTS, and empty site cells, stay as measured (the pooled site)
    few = new.subset(np.arange(MIN_SUBJECTS - 1))
    few = dataclasses.replace(few, sites=pd.Series(["S4"] * len(few), name="site"))
    assert "S4" not in harmoniser.with_new_sites(few).sites
    empty = pd.Series([None] * len(few), name="site", dtype=object)
    np.testing.assert_array_equal(harmoniser.transform("gm", few.inputs["gm"], empty),
                                  few.inputs["gm"].astype(np.float32))


def test_images_not_acquired_stay_empty_and_do_not_count():
    subset, _ = _sites()
    gm = subset.inputs["gm"].copy()
    gm[[0, 50, 100]] = np.nan
    with_gaps = dataclasses.replace(subset, inputs={"gm": gm})
    harmoniser = SiteIntensity.fit(with_gaps)
    out = harmoniser.transform("gm", gm, subset.sites)
    assert np.isnan(out[[0, 50, 100]]).all() and np.isfinite(np.delete(out, [0, 50, 100], axis=0)).all()


def test_saved_and_rebuilt_it_harmonises_alike_and_bad_subsets_are_refused():
    subset, _ = _sites()
    harmoniser = SiteIntensity.fit(subset)
    again = SiteIntensity.from_dict(harmoniser.to_dict(), {"gm": SPACE.feature_coordinates()})
    np.testing.assert_allclose(again.transform("gm", subset.inputs["gm"], subset.sites),
                               harmoniser.transform("gm", subset.inputs["gm"], subset.sites), atol=1e-5)
    with pytest.raises(InputError, match="the subjects have no site"):
        SiteIntensity.fit(dataclasses.replace(subset, sites=None))
    with pytest.raises(InputError, match=f"no site has {MIN_SUBJECTS} subjects with input 'gm'"):
        SiteIntensity.fit(subset.subset(np.arange(MIN_SUBJECTS - 1)))
    # features without coordinates (a region table): a gain and a constant offset per site
    assert monomials(None, 7, 3).shape == (7, 1)
    assert monomials(SPACE.feature_coordinates(), SPACE.n_features, 3).shape == (72, 10)   # 2 varying axes


def _shifted_cohort(n=240, seed=0):
    """gm ~ N(0, 1), y = 1.5 gm + noise 0.3, at sites S1, S2 whose scanners render gm with gains 1 and 2
    and offsets 0 and 1: without harmonising, the model must learn each scanner's rendering."""
    rng = np.random.default_rng(seed)
    gm = rng.standard_normal((n, 16))
    site = rng.integers(0, 2, n)
    y = 1.5 * gm + 0.3 * rng.standard_normal((n, 16))
    measured = np.where(site[:, None] == 1, 2.0 * gm + 1.0, gm)
    split = ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    return Cohort.from_arrays({"gm": measured}, y, split=split,
                              sites=pd.Series([f"S{s + 1}" for s in site], name="site"))


def test_a_fit_with_sites_harmonises_saves_and_adapts_a_new_scanner(make_preset, tmp_path):
    from inva_pyro.adaptation import adapt, with_new_site_intensities
    from inva_pyro.estimator import InVA
    cohort = _shifted_cohort()
    model = InVA(make_preset(training={"epochs": 3})).fit(cohort.train, cohort.val, seed=0, progress=False,
                                                          device="cpu", run_dir=tmp_path / "run")
    harmoniser = model.standardizer.site_intensity
    assert set(harmoniser.sites) == {"S1", "S2"}
    gains = {s: harmoniser.sites[s]["gm"]["gain"] for s in ("S1", "S2")}
    assert abs(gains["S2"] / gains["S1"] - 2.0) < 0.1   # sd ratio over 16 features x ~60 subjects per site
    assert (tmp_path / "run" / "site_intensity.json").exists()
    loaded = InVA.load(tmp_path / "run")
    np.testing.assert_array_equal(model.predict(cohort.test, seed=1).mean, loaded.predict(cohort.test, seed=1).mean)
    off = InVA(make_preset(training={"epochs": 1, "site_intensity": False})).fit(
        cohort.train, cohort.val, seed=0, progress=False, device="cpu", run_dir=tmp_path / "raw")
    assert off.standardizer.site_intensity is None and not (tmp_path / "raw" / "site_intensity.json").exists()
    # a new scanner: S1's test subjects rendered with gain 0.5 and offset -2
    test = cohort.test.subset(np.flatnonzero(cohort.test.sites.to_numpy() == "S1"))
    new = dataclasses.replace(test, inputs={"gm": 0.5 * test.inputs["gm"] - 2.0},
                              sites=pd.Series(["S3"] * len(test), name="site"))
    adapted = adapt(loaded, new, seed=0, steps=5)
    terms = adapted.standardizer.site_intensity.sites["S3"]["gm"]
    assert abs(terms["gain"] / gains["S1"] - 0.5) < 0.1 and "S3" not in loaded.standardizer.site_intensity.sites
    # harmonised, the new scanner's images read as S1's did
    np.testing.assert_allclose(adapted.tensors(new)[0][0].numpy().mean(), loaded.tensors(test)[0][0].numpy().mean(),
                               atol=0.2)
    adapted.save(tmp_path / "adapted")
    assert "S3" in InVA.load(tmp_path / "adapted").standardizer.site_intensity.sites
    # without labels: the new site's images read on the training scale, the model itself unchanged
    reading, sites = with_new_site_intensities(loaded, new)
    assert sites == ["S3"] and "S3" not in loaded.standardizer.site_intensity.sites
    np.testing.assert_allclose(reading.tensors(new)[0][0].numpy(), adapted.tensors(new)[0][0].numpy())
    assert with_new_site_intensities(loaded, test) == (loaded, [])   # every site known: nothing to fit
    assert with_new_site_intensities(off, new) == (off, [])          # a run without site intensities


def test_the_site_calibration_acts_in_image_units_and_starts_at_the_sites_outcome_moments():
    import torch
    from inva_pyro.data.preprocessing import Standardizer
    from inva_pyro.data.site_intensity import outcome_site_start
    from inva_pyro.model.conditions import ConditionNetwork
    rng = np.random.default_rng(4)
    y0 = rng.standard_normal((30, 5)) * [1.0, 2.0, 0.5, 1.0, 3.0] + [10.0, 0.0, -4.0, 2.0, 7.0]
    y0, site = np.concatenate([y0, y0]), np.repeat([0, 1], 30)   # the same subjects at both sites
    y = np.where(site[:, None] == 1, 3.0 + 2.0 * y0, y0)   # site S2's scanner: y = 3 + 2 y0
    subset = Subset(subjects=[str(i) for i in range(60)], inputs={"gm": y0}, outcome=y,
                    sites=pd.Series([f"S{s + 1}" for s in site], name="site"))
    st = Standardizer.fit(subset)
    kappa = float(np.median(st.outcome_scale))
    offset, log_gain = outcome_site_start(subset, ["S1", "S2", "S9"], st)
    gain = np.exp(log_gain)
    # y = a_s kappa + b_s y_free at each site: S2 against S1 is y = 3 + 2 y0 whatever the reference
    assert abs(gain[1] / gain[0] - 2.0) < 1e-6 and abs(offset[1] * kappa - 2.0 * offset[0] * kappa - 3.0) < 1e-4
    assert offset[2] == 0.0 and log_gain[2] == 0.0   # a level without subjects starts as nothing
    # in the program's standardised units the same calibration: y' = b y0' + (a kappa + (b - 1) m) / t
    network = ConditionNetwork([], n_sites=2, site_dim=2)
    assert network.site_affine(torch.tensor([0, 1]))[0].shape == (2, 1)   # runs from before: standardised units
    network.set_outcome_units(st.outcome_mean, st.outcome_scale)
    network.start_sites([0.0, 3.0 / kappa], [0.0, np.log(2.0)])
    shift, scale = network.site_affine(torch.tensor([0, 1]))
    y0_std = torch.as_tensor((y0 - st.outcome_mean) / st.outcome_scale, dtype=torch.float32)
    np.testing.assert_allclose((shift[1] + scale[1] * y0_std).detach().numpy(), st.transform_outcome(3.0 + 2.0 * y0), atol=1e-4)
    np.testing.assert_allclose((shift[0] + scale[0] * y0_std).detach().numpy(), st.transform_outcome(y0), atol=1e-5)


def test_subjects_read_from_disk_give_the_same_site_intensities(tmp_path):
    from inva_pyro import cli
    from inva_pyro.data.preprocessing import Standardizer
    from inva_pyro.data.site_intensity import outcome_site_start
    assert cli.main(["simulate", "--design", "multisite", "--sites", "2", "--n-subjects", "40", "--seed", "3",
                     "--out", str(tmp_path / "cohort")]) == 0
    eager, lazy = (Cohort.from_dir(tmp_path / "cohort", site="site", lazy=flag).train for flag in (False, True))
    direct, streamed = (Standardizer.fit_training(s, site_intensity=True) for s in (eager, lazy))
    assert direct.site_intensity.sites and direct.site_intensity.sites == streamed.site_intensity.sites
    for name in direct.input_mean:
        np.testing.assert_allclose(streamed.input_mean[name], direct.input_mean[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(streamed.input_scale[name], direct.input_scale[name], rtol=1e-5, atol=1e-5)
    levels = sorted(direct.site_intensity.sites)
    np.testing.assert_allclose(outcome_site_start(lazy, levels, direct), outcome_site_start(eager, levels, direct))
