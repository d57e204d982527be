"""One source of defaults: ``Preset()`` is the ``inva`` preset, every preset lists only what differs from it,
and the settings reference in docs/model.md is generated from the settings' own descriptions."""
from __future__ import annotations

from pathlib import Path

import pytest

from inva_pyro.config import (FAMILY_CONFIGS, SETTINGS_BEGIN, SETTINGS_END, PredictionConfig, Preset,
                              TrainingConfig, load_preset, parse_preset, preset_folder, preset_names, read_toml,
                              settings_markdown)
from inva_pyro.errors import InputError

MODEL_MD = Path(__file__).resolve().parents[1] / "docs" / "model.md"
CLASSES = {**{f"[model] {name}": cls for name, cls in FAMILY_CONFIGS.items()},
           "[training]": TrainingConfig, "[prediction]": PredictionConfig, "preset": Preset}


def test_the_default_preset_is_the_inva_preset():
    assert Preset() == load_preset("inva")
    assert Preset().model.spatial_smoothing == 100.0


@pytest.mark.parametrize("table", CLASSES)
def test_every_setting_says_what_it_is(table):
    undocumented = [name for name, field in CLASSES[table].model_fields.items() if not field.description]
    assert not undocumented


def test_the_settings_reference_in_the_docs_is_the_generated_one():
    text = MODEL_MD.read_text(encoding="utf-8")
    block = text[text.index(SETTINGS_BEGIN):text.index(SETTINGS_END) + len(SETTINGS_END)]
    assert block == settings_markdown(), "regenerate it: python -m inva_pyro.config --markdown docs/model.md"
    for cls in (FAMILY_CONFIGS["inva"], TrainingConfig, PredictionConfig):
        for name in cls.model_fields:
            assert f"| `{name}` |" in block


@pytest.mark.parametrize("name", preset_names())
def test_a_preset_lists_only_what_differs_from_the_defaults(name):
    raw = read_toml((preset_folder() / f"{name}.toml").read_bytes(), name)
    family = raw.get("model", {}).get("family", "inva")
    defaults = {"model": FAMILY_CONFIGS[family](), "training": TrainingConfig(), "prediction": PredictionConfig()}
    repeated = [f"{table}.{key}" for table, values in raw.items() if isinstance(values, dict)
                for key, value in values.items() if key != "family" and getattr(defaults[table], key) == value]
    assert not repeated, f"models/{name}.toml repeats defaults: {repeated}"


def test_old_presets_and_run_folders_call_the_spatial_covariance_joint():
    old = parse_preset({"prediction": {"joint": False}})
    assert old.prediction.spatial_covariance is False
    with pytest.raises(InputError, match="prediction.spatial_covarianse: Extra inputs are not permitted"):
        parse_preset({"prediction": {"spatial_covarianse": False}}, "my.toml")
