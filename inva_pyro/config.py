"""Model presets: TOML files validated with pydantic.

A preset has three tables, ``[model]`` (architecture), ``[training]`` (SVI settings) and
``[prediction]`` (posterior predictive and calibration settings). Named presets live in the
top-level ``models/`` folder, which is installed as ``inva_pyro.presets``.

``[model]`` is a union discriminated on ``family``: ``inva`` (the default when ``family`` is
absent; the Pyro program, whose ``structure`` also gives the VAE peers), ``ridge``, ``bart`` and
``tensor`` (the peer models of ``inva_pyro.peers``), each with its own validated fields.
``[training]`` and ``[prediction]`` are shared; peers ignore the SVI settings that do not apply
to them (they use ``training.val_share`` and the whole ``[prediction]`` table).
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib


DEFAULT_DESCRIPTION = "InVA with local voxel pathway (the best default on held-out data)"


class _Strict(BaseModel):
    # Unknown keys in a preset are almost always typos; refuse them rather than ignore them.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    family: Literal["inva"] = Field("inva", description="the model family: the InVA Pyro program (its VAE peers "
                                    "are structures of it)")
    structure: Literal["integrative", "separate", "concatenated", "joint"] = Field(
        "integrative", description="integrative: InVA (shallow + shared deep latents); separate: one VAE per "
        "modality without the shared level; concatenated: one VAE on all inputs concatenated; joint: one "
        "subject latent (size shallow_dim) shared by every modality, its posterior a product of the "
        "modalities' Gaussian experts and the prior (any subset of inputs gives one)")
    shallow_dim: int = Field(16, ge=1, description="p: shallow latent size per modality")
    deep_dim: int = Field(8, ge=1, description="q: deep (shared-encoder) latent size")
    hidden: int = Field(256, ge=1, description="hidden units of the modality-specific encoders/decoders")
    shared_hidden: int = Field(64, ge=1, description="hidden units of the shared encoder/decoder")
    predictor: Literal["paper", "local"] = Field(
        "local", description="paper: the predictor sees the latent means and sds only, as in the paper; local: also "
        "the inputs at each outcome voxel, through a small network shared by the voxels (the local pathway)")
    predictor_hidden: int = Field(64, ge=1, description="D: width of the predictor's last hidden layer")
    local_hidden: int = Field(32, ge=1, description="hidden units of the local pathway's voxel network")
    local_channels: int = Field(4, ge=1, description="outputs of the shared voxel network, mixed per voxel")
    voxel_embedding: int = Field(4, ge=0, description="learned per-voxel code fed to the voxel network")
    context_dim: int = Field(8, ge=0, description="subject summary fed to the voxel network")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout in the predictor's trunk while training")
    bayesian_output: bool = Field(True, description="the predictor's output layer (W, b) as global latent variables "
                                  "with a Normal(0, output_prior_scale^2) prior and a mean-field posterior (false: "
                                  "point weights)")
    output_prior_scale: float = Field(1.0, gt=0.0, description="tau: prior sd of the output layer's weights")
    spatial_smoothing: float = Field(100.0, ge=0.0, description="lambda: prior precision of the differences "
                                     "between neighbouring voxels' predictor parameters, relative to the "
                                     "output layer's (model/smoothing.py); 0: none. Needs a volume outcome or "
                                     "an fsaverage5 surface")
    min_scale: float = Field(1e-3, gt=0.0, description="floor of every predicted sd (standardised units)")
    site_embedding: int = Field(4, ge=1, description="size of the learned site embedding read by the input "
                                "decoders and the predictor (fits with --site only)")
    # The VAE tutorial's toolkit (docs/toolkit.md)
    network: Literal["mlp", "conv"] = Field("mlp", description="encoders/decoders: MLPs on masked vectors, or "
                                            "2-D/3-D convolutions on the image grid (volumes and 2-D grids only)")
    conv_channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [8, 16, 32], min_length=1, description="network 'conv': channels of the encoder's "
        "stride-2 stages, one per stage (the decoder mirrors them)")
    reconstruction: Literal["gaussian", "laplace"] = Field("gaussian", description="likelihood of the inputs")
    dssim_weight: float = Field(0.0, ge=0.0, description="weight per voxel of the DSSIM = 1 - SSIM term of each "
                                "input's reconstruction (2-D/3-D grids only)")
    dssim_window: int = Field(7, ge=3, description="SSIM window (odd)")
    mmd_weight: float = Field(0.0, ge=0.0, description="weight per subject of MMD(aggregate posterior, prior) on "
                              "the top latent level (InfoVAE)")
    mmd_kernel: Literal["imq", "rbf"] = Field("imq", description="kernel of the MMD term: inverse multiquadric "
                                              "or Gaussian")
    mmd_bandwidth: float | None = Field(None, gt=0.0, description="kernel scale C; default 2 x latent size")
    deep_kl_weight: float = Field(1.0, ge=0.0, description="extra weight on the deep level's KL (0 with "
                                  "mmd_weight > 0: InfoVAE on the deep latents)")

    @model_validator(mode="after")
    def _compatible(self):
        if self.dssim_window % 2 == 0:
            raise ValueError("dssim_window must be odd")
        if (self.network == "conv" or self.dssim_weight > 0) and self.structure == "concatenated":
            raise ValueError("network 'conv' and dssim_weight need one image per VAE; structure 'concatenated' "
                             "has none")
        return self


class ResidualIntervalConfig(_Strict):
    """Predictive intervals of a point estimator from validation residuals (``peers/residual.py``)."""
    interval_scale: Literal["voxel", "pooled"] = Field(
        "voxel", description="raw sd: per-voxel RMS of validation residuals (shrunk towards the pooled RMS), "
        "or one pooled RMS for every voxel")
    scale_share: float = Field(0.5, gt=0.0, lt=1.0, description="share of the validation subjects that fits the "
                               "raw sd; the others fit the calibration quantiles")
    scale_shrinkage: float = Field(5.0, ge=0.0, description="pseudo-subjects of pooled variance added to each "
                                   "voxel's residual variance (0: none)")


class RidgeConfig(ResidualIntervalConfig):
    family: Literal["ridge"] = Field("ridge", description="multi-output ridge regression on every input")
    alpha_min: float = Field(1e-2, gt=0.0, description="smallest ridge penalty of the cross-validated grid")
    alpha_max: float = Field(1e5, gt=0.0, description="largest ridge penalty of the grid")
    n_alphas: int = Field(15, ge=1, description="penalties on a log grid between alpha_min and alpha_max")
    alpha_per_target: bool = Field(False, description="one penalty per outcome voxel instead of one for all")

    @model_validator(mode="after")
    def _grid(self):
        if self.alpha_max < self.alpha_min:
            raise ValueError("alpha_max must be at least alpha_min")
        return self


class TensorConfig(ResidualIntervalConfig):
    family: Literal["tensor"] = Field("tensor", description="low-rank (CP) tensor regression")
    ranks: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128],
        min_length=1, description="candidate CP ranks R of the coefficient (chosen by cross-validation)")
    alpha_min: float = Field(1e-1, gt=0.0, description="smallest ridge penalty of the cross-validated grid")
    alpha_max: float = Field(1e5, gt=0.0, description="largest ridge penalty of the grid")
    n_alphas: int = Field(13, ge=1, description="penalties on a log grid between alpha_min and alpha_max")
    cv_folds: int = Field(5, ge=2, description="K-fold cross-validation over training subjects for (R, alpha)")

    @model_validator(mode="after")
    def _grid(self):
        if self.alpha_max < self.alpha_min:
            raise ValueError("alpha_max must be at least alpha_min")
        return self


class BartConfig(_Strict):
    family: Literal["bart"] = Field("bart", description="voxel-wise BART (stochtree)")
    num_trees: int = Field(20, ge=1, description="trees per voxel's forest")
    num_gfr: int = Field(10, ge=0, description="grow-from-root (XBART) warm-start sweeps, discarded")
    num_burnin: int = Field(0, ge=0, description="MCMC burn-in sweeps after the warm start, discarded")
    num_draws: int = Field(50, ge=1, description="posterior draws kept per voxel")
    keep_every: int = Field(1, ge=1, description="thinning of the kept MCMC draws")
    alpha: float = Field(0.95, gt=0.0, lt=1.0, description="tree prior: P(split) = alpha (1 + depth)^-beta")
    beta: float = Field(2.0, ge=0.0, description="tree prior: depth penalty exponent (see alpha)")
    min_samples_leaf: int = Field(5, ge=1, description="fewest training subjects in a leaf")
    max_depth: int = Field(10, ge=1, description="deepest split of a tree")
    neighbourhood: int = Field(1, ge=0, description="radius r: each local input's mean over the (2r+1)^d box "
                               "around the voxel (inside the mask) is an extra feature; 0: the voxel only")
    n_jobs: int = Field(-1, description="worker processes over voxels (joblib; -1: every core)")


class TrainingConfig(_Strict):
    epochs: int = Field(300, ge=1, description="most epochs of SVI (early stopping usually ends sooner)")
    batch_size: int = Field(32, ge=1, description="subjects per SVI step (the ELBO is scaled to the training size)")
    learning_rate: float = Field(2e-3, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay of the networks")
    kl_weight: float = Field(1.0, ge=0.0, description="final weight of the latent KL terms")
    prediction_weight: float = Field(1.0, gt=0.0, description="weight of the outcome log-likelihood")
    kl_anneal_epochs: int = Field(20, ge=0, description="epochs over which the KL weight rises linearly")
    patience: int = Field(30, ge=1, description="epochs without validation improvement before stopping")
    val_share: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share when the manifest has no split")
    calibration_share: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of the validation subjects kept out of early stopping and used "
        "only to calibrate (voxel quantiles, missingness patterns, the error covariance and its region scales); "
        "0: every validation subject does both. Early stopping picks the epoch that fits its subjects best, so "
        "calibrating on them can under-cover large regions (docs/uncertainty.md, section 8)")
    grad_clip: float = Field(10.0, gt=0.0, description="largest global norm of a step's gradient (larger ones are "
                             "scaled down)")
    mixed_precision: bool = Field(False, description="run the networks under torch.autocast during training "
                                  "in bfloat16 (CPU and CUDA); log-densities stay float32")
    cuda_graphs: bool = Field(True, description="on CUDA, with the cohort in device memory: record each "
                              "training step once as a CUDA graph and replay it (train/graphs.py); "
                              "no effect on the CPU, with --lazy or with --devices")
    kl_schedule: Literal["constant", "linear", "cyclical"] = Field(
        "linear", description="KL weight over epochs: constant, linear warm-up over kl_anneal_epochs, or "
        "cyclical annealing (Fu et al. 2019) with kl_cycles cycles")
    kl_cycles: int = Field(4, ge=1, description="kl_schedule 'cyclical': number of cycles over the epochs")
    kl_cycle_ratio: float = Field(0.5, gt=0.0, le=1.0, description="share of each cycle spent increasing")
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="structure 'joint' only: each training "
                                 "step hides each input of each subject with this probability (never every input "
                                 "of a subject), so the model learns to predict from any subset of its inputs")
    input_dropout_scheme: Literal["each", "one"] = Field(
        "each", description="'each': every input of a subject is hidden with probability input_dropout; "
        "'one': with probability input_dropout one input of the subject, chosen at random, is hidden "
        "(each one-input-missing pattern then gets input_dropout / K of the steps; docs/model.md)")
    reconstruct_hidden: bool = Field(
        False, description="inputs hidden by input_dropout stay in the reconstruction terms: the encoders of "
        "the others must then infer what those say about them (and nothing more); false: a hidden input is "
        "treated as never acquired")
    site_intensity: bool = Field(
        True, description="a fit with sites (--site) first brings each site's inputs to one scale: a gain and a "
        "smooth (cubic) offset field per site and input, from the training subjects' images; inva adapt fits a "
        "new site's from its subjects' images (docs/multicentre.md). false: inputs as measured")
    pattern_submodels: bool = Field(
        False, description="structure 'joint' only: after training, fit the same preset once without each input "
        "k (the pattern submodel, Fletcher Mercaldo & Blume 2020); a subject lacking only k is then predicted by "
        "the equal-weight mixture of the joint model and that submodel. K more fits (docs/model.md, "
        "\"Pattern submodels\")")


class PredictionConfig(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        # Run folders and presets written before the rename call the spatial covariance ``joint``.
        if isinstance(data, dict) and "joint" in data and "spatial_covariance" not in data:
            data = {("spatial_covariance" if k == "joint" else k): v for k, v in data.items()}
        return data

    num_samples: int = Field(500, ge=2, description="posterior predictive draws per subject")
    levels: list[float] = Field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95],
                                description="central interval levels written by predict (lo{P}, hi{P} maps)")
    calibration: Literal["quantile", "variance", "none"] = Field(
        "quantile", description="recalibration of the intervals on validation subjects: quantile recalibration of "
        "the standardised residuals, variance scaling, or none (docs/calibration.md)")
    spatial_covariance: bool = Field(
        True, description="fit the outcome's spatial error covariance and the region calibration on the validation "
        "subjects (predict/spatial.py): region means and correlated draws of whole images")
    covariance_rank: Annotated[int, Field(ge=1)] | Literal["full"] = Field(
        16, description="rank of the error covariance's factor, by probabilistic PCA of the validation "
        "residuals (at most n_val - 1; 16: the energy score of joint draws prefers denoised directions, "
        "docs/uncertainty.md); 'full': their sample second moment (rank n_val)")
    coverage_confidence: float | None = Field(
        None, ge=0.5, le=0.99, description="probability (0.5 to 0.99) that a fit's intervals (voxels, regions, "
        "whole mask) cover at least their nominal level over the draw of the validation subjects "
        "(training-conditional conformal; 0.9: at most one fit in ten below nominal, for wider intervals); unset: "
        "intervals right on average over fits (docs/calibration.md)")
    group_spread: float = Field(
        0.04, gt=0, description="calibration per group (site): the prior sd of a group's coverage of the pooled "
        "80% interval; a group's own quantiles get weight n_g / (n_g + n0), n0 = (variance of one subject's "
        "coverage) / group_spread^2 (docs/calibration.md)")
    group_min_subjects: int = Field(5, ge=1, description="calibration per group: the fewest validation subjects "
                                    "for a group's own calibration; smaller groups get the pooled one")


def _family_of(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("family", "inva")
    return getattr(value, "family", "inva")


FAMILY_CONFIGS: dict[str, type[BaseModel]] = {"inva": ModelConfig, "ridge": RidgeConfig, "bart": BartConfig,
                                              "tensor": TensorConfig}

AnyModelConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in FAMILY_CONFIGS.items())],
    Discriminator(_family_of, custom_error_type="unknown_family",
                  custom_error_message=f"unknown model family (known: {', '.join(FAMILY_CONFIGS)})"),
]


class Preset(_Strict):
    """A model preset; ``Preset()`` is the default ``inva`` preset, and a TOML preset lists what differs from it."""
    name: str = Field("inva", description="the preset's name (shown in messages and recorded in the run)")
    description: str = Field(DEFAULT_DESCRIPTION, description="one line saying what the preset is")
    model: AnyModelConfig = Field(default_factory=ModelConfig, description="the [model] table")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="the [training] table")
    prediction: PredictionConfig = Field(default_factory=PredictionConfig, description="the [prediction] table")

    @model_validator(mode="after")
    def _input_dropout_needs_joint(self):
        if self.training.input_dropout > 0 and getattr(self.model, "structure", None) != "joint":
            raise ValueError("training.input_dropout needs model.structure = 'joint' (the only structure that "
                             "predicts from a subset of its inputs)")
        if self.training.reconstruct_hidden and not self.training.input_dropout > 0:
            raise ValueError("training.reconstruct_hidden needs training.input_dropout > 0 (it reconstructs the "
                             "inputs that input dropout hides)")
        if self.training.pattern_submodels and getattr(self.model, "structure", None) != "joint":
            raise ValueError("training.pattern_submodels needs model.structure = 'joint' (the only structure that "
                             "predicts subjects lacking an input)")
        return self


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
    return parse_preset(read_toml(data, where), where)


def read_toml(data: bytes, where: str) -> dict:
    """The TOML document in ``data``; one line naming ``where`` if it is not valid TOML (or not UTF-8)."""
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not valid TOML ({exc})") from None


def preset_to_toml(preset: Preset) -> str:
    """The preset as a TOML file that ``load_preset`` reads back to an equal preset.

    Written by ``inva tune`` (best.toml); settings that are None are left out, since None is
    their default and TOML has no null.
    """
    data = preset.model_dump()
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
    for table in ("model", "training", "prediction"):
        lines += ["", f"[{table}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in data[table].items() if value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's repr of a float (1e-05, 0.1, inf) is valid TOML
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string uses JSON's escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def parse_preset(raw: dict, where: str = "preset") -> Preset:
    try:
        return Preset.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        # The discriminated union adds the family tag to the location (model.ridge.n_alphas): drop it.
        loc = ".".join(str(x) for i, x in enumerate(first["loc"])
                       if not (i == 1 and first["loc"][0] == "model" and x in FAMILY_CONFIGS))
        raise InputError(f"{where}: {loc}: {first['msg']}") from None


SETTINGS_BEGIN = "<!-- settings: generated by `python -m inva_pyro.config --markdown`; do not edit by hand -->"
SETTINGS_END = "<!-- end of settings -->"


def settings_markdown() -> str:
    """Every preset setting with its default and meaning, one Markdown table per TOML table (docs/model.md)."""
    tables = [("[model]", "the InVA program (`family = \"inva\"`, the default)", ModelConfig),
              ("[training]", "", TrainingConfig), ("[prediction]", "", PredictionConfig),
              *((("[model]", f"the `{name}` peer", FAMILY_CONFIGS[name]) for name in ("ridge", "tensor", "bart")))]
    lines = []
    for table, what, cls in tables:
        lines += ["", f"**`{table}`**" + (f": {what}" if what else ""), "", "| setting | default | meaning |",
                  "|---|---|---|"]
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
            meaning = field.description + (f" (one of {', '.join(f'`{c}`' for c in choices)})"
                                           if len(choices) > 1 else "")
            shown = "unset" if default is None else _toml_value(default)
            lines.append(f"| `{name}` | `{shown}` | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join([SETTINGS_BEGIN, *lines, "", SETTINGS_END])


def _write_settings_reference(path: Path) -> None:
    """Replace the generated block of ``path`` (between the settings markers) with ``settings_markdown()``."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(SETTINGS_BEGIN), text.index(SETTINGS_END) + len(SETTINGS_END)
    path.write_text(text[:start] + settings_markdown() + text[end:], encoding="utf-8")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m inva_pyro.config",
                                     description="the reference of every preset setting, as Markdown")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE", required=True,
                        help="print it, or write it between the settings markers of FILE (docs/model.md)")
    target = parser.parse_args().markdown
    if target == "-":
        print(settings_markdown())
    else:
        _write_settings_reference(Path(target))
