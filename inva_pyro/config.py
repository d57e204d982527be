"""Model presets: TOML files validated with pydantic.

A preset has three tables, ``[model]`` (architecture), ``[training]`` (SVI settings) and
``[prediction]`` (posterior predictive and calibration settings). Named presets live in the
top-level ``models/`` folder, which is installed as ``inva_pyro.presets``.
"""
from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError


class _Strict(BaseModel):
    # Unknown keys in a preset are almost always typos; refuse them rather than ignore them.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    family: Literal["inva"] = "inva"
    structure: Literal["integrative", "separate", "concatenated"] = Field(
        "integrative", description="integrative: InVA (shallow + shared deep latents); separate: one VAE per "
        "modality without the shared level; concatenated: one VAE on all inputs concatenated")
    shallow_dim: int = Field(16, ge=1, description="p: shallow latent size per modality")
    deep_dim: int = Field(8, ge=1, description="q: deep (shared-encoder) latent size")
    hidden: int = Field(256, ge=1, description="hidden units of the modality-specific encoders/decoders")
    shared_hidden: int = Field(64, ge=1, description="hidden units of the shared encoder/decoder")
    predictor: Literal["paper", "local"] = "local"
    predictor_hidden: int = Field(64, ge=1, description="D: width of the predictor's last hidden layer")
    local_hidden: int = Field(32, ge=1)
    local_channels: int = Field(4, ge=1, description="outputs of the shared voxel network, mixed per voxel")
    voxel_embedding: int = Field(4, ge=0, description="learned per-voxel code fed to the voxel network")
    context_dim: int = Field(8, ge=0, description="subject summary fed to the voxel network")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    bayesian_output: bool = True
    output_prior_scale: float = Field(1.0, gt=0.0)
    min_scale: float = Field(1e-3, gt=0.0, description="floor of every predicted sd (standardised units)")


class TrainingConfig(_Strict):
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    kl_weight: float = Field(1.0, ge=0.0, description="final weight of the latent KL terms")
    prediction_weight: float = Field(1.0, gt=0.0, description="weight of the outcome log-likelihood")
    kl_anneal_epochs: int = Field(20, ge=0, description="epochs over which the KL weight rises linearly")
    patience: int = Field(30, ge=1, description="epochs without validation improvement before stopping")
    val_share: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share when the manifest has no split")
    grad_clip: float = Field(10.0, gt=0.0)


class PredictionConfig(_Strict):
    num_samples: int = Field(500, ge=2)
    levels: list[float] = Field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95])
    calibration: Literal["quantile", "variance", "none"] = "quantile"


class Preset(_Strict):
    name: str = "custom"
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    prediction: PredictionConfig = Field(default_factory=PredictionConfig)

    def to_toml_dict(self) -> dict:
        return self.model_dump()


def preset_folder():
    """The named presets: installed as ``inva_pyro.presets``; in a source tree, ``models/`` itself."""
    try:
        return resources.files("inva_pyro.presets")
    except ModuleNotFoundError:  # running from a checkout, where the package dir shadows the install
        return Path(__file__).resolve().parent.parent / "models"


def preset_names() -> list[str]:
    folder = preset_folder()
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A preset by name (``models/NAME.toml``) or by path to a TOML file of the same form."""
    text_source = str(name_or_path)
    path = Path(text_source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise InputError(f"{path}: preset file not found")
        data = path.read_bytes()
        where = str(path)
    else:
        candidate = preset_folder() / f"{text_source}.toml"
        if not candidate.is_file():
            raise InputError(f"--model {text_source}: no such preset (known: {', '.join(preset_names())})")
        data = candidate.read_bytes()
        where = f"models/{text_source}.toml"
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not valid TOML ({exc})") from None
    return parse_preset(raw, where)


def parse_preset(raw: dict, where: str = "preset") -> Preset:
    try:
        return Preset.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise InputError(f"{where}: {loc}: {first['msg']}") from None
