"""Latent-space analysis of a fitted InVA: per-subject posterior summaries and latent traversals.

``latent_table`` gives, per subject and VAE input k (``module.vae_names``: the input names, or
``concat`` for the concatenated peer), the means and sds of the amortised posteriors

    q(h_k | x_k)       shallow latent: columns {k}_shallow_mean_{j}, {k}_shallow_sd_{j}, j < p
    q(z_k | h_k = mu)  deep latent:    columns {k}_deep_mean_{j},    {k}_deep_sd_{j},    j < q

(the deep columns only for the integrative structure; the deep posterior is evaluated at the
shallow mean, as in the predictor's input). Structure ``joint`` adds, first, the subject latent's
posterior given every input the subject has (the product of experts, ``model/experts.py``):

    q(z | inputs present)  columns subject_joint_mean_{j}, subject_joint_sd_{j}, j < p

and its shallow columns are the modality experts q_k(z | x_k). A subject lacking input k has NaN in
input k's columns (its joint columns use the inputs it has). These are deterministic functions of the inputs,
standardised with the training statistics, so the table is reproducible. ``analysis/latent_glm.py``
tests them against covariates; ``latent_traversal`` shows what each deep latent encodes.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from ..data.io import atomic_write_bytes, atomic_write_text

SUBJECT_COLUMN = "subject"
_CHUNK = 256  # subjects encoded at once


def _module(model):
    if getattr(model, "module", None) is None:
        raise RuntimeError("fit or load the model first")
    if model.info.get("family", "inva") != "inva":
        raise InputError(f"latents need an inva model; this run is a {model.info.get('family')} model")
    return model.module


def latent_columns(module) -> list[str]:
    """The table's columns in order: per VAE input, shallow mean/sd then deep mean/sd."""
    p, q = module.cfg.shallow_dim, module.cfg.deep_dim
    cols = []
    if getattr(module, "joint", False):
        cols += [f"subject_joint_mean_{j}" for j in range(p)] + [f"subject_joint_sd_{j}" for j in range(p)]
    for name in module.vae_names:
        cols += [f"{name}_shallow_mean_{j}" for j in range(p)] + [f"{name}_shallow_sd_{j}" for j in range(p)]
        if module.hierarchical:
            cols += [f"{name}_deep_mean_{j}" for j in range(q)] + [f"{name}_deep_sd_{j}" for j in range(q)]
    return cols


@torch.no_grad()
def _encode_all(model, subset) -> dict[str, dict[str, np.ndarray]]:
    """name -> {shallow_mean, shallow_sd[, deep_mean, deep_sd]}: (n, dim) float64 arrays."""
    module = _module(model)
    missing = [n for n in model.info["inputs"] if n not in subset.inputs]
    if missing:
        raise InputError(f"the subjects lack the input(s) this model was trained on: {', '.join(missing)}")
    xs, _ = model.tensors(subset, with_outcome=False)
    was_training = module.training
    module.eval()
    joint = getattr(module, "joint", False)
    parts: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in ["subject"] * joint + module.vae_names}
    try:
        for start in range(0, len(subset), _CHUNK):
            chunk = [x[start:start + _CHUNK] for x in xs]
            present = module.vae_presence(module.split_missing(chunk)[1])
            encoded = module.encode(chunk)
            if joint:
                loc, scale = module.joint_posterior(encoded, present)
                parts["subject"].setdefault("joint_mean", []).append(loc.double().cpu().numpy())
                parts["subject"].setdefault("joint_sd", []).append(scale.double().cpu().numpy())
            for k, (name, (h_loc, h_scale)) in enumerate(zip(module.vae_names, encoded)):
                stats = {"shallow_mean": h_loc, "shallow_sd": h_scale}
                if module.hierarchical:
                    stats["deep_mean"], stats["deep_sd"] = module.shared_encoder(h_loc)
                absent = (~present[:, k]).cpu().numpy()
                for key, value in stats.items():
                    value = value.double().cpu().numpy()
                    value[absent] = np.nan  # the input was not acquired: nothing to summarise
                    parts[name].setdefault(key, []).append(value)
    finally:
        module.train(was_training)
    return {name: {key: np.concatenate(values) for key, values in stats.items()} for name, stats in parts.items()}


def latent_table(model, subset) -> pd.DataFrame:
    """One row per subject (index ``subject``), columns ``latent_columns(model.module)``."""
    module = _module(model)
    encoded = _encode_all(model, subset)
    blocks = []
    for name in list(encoded):
        for key in ("joint_mean", "joint_sd", "shallow_mean", "shallow_sd", "deep_mean", "deep_sd"):
            if key in encoded[name]:
                values = encoded[name][key]
                blocks.append(pd.DataFrame(values, columns=[f"{name}_{key}_{j}" for j in range(values.shape[1])]))
    table = pd.concat(blocks, axis=1)
    table.index = pd.Index([str(s) for s in subset.subjects], name=SUBJECT_COLUMN)
    return table[latent_columns(module)]


def write_latents(model, subset, path: str | Path) -> Path:
    """Write ``latent_table`` as CSV (``subject`` first), atomically; returns the path."""
    path = Path(path)
    text = latent_table(model, subset).to_csv(float_format="%.8g")
    atomic_write_text(path, text)
    return path


# --------------------------------------------------------------------------- traversal


def _modality_decoder(module, model, modality: str):
    """(decoder number k, feature slice, VAE name): decoder k maps a shallow latent to ``modality``'s
    standardised features (``module.decode``)."""
    inputs = list(model.info["inputs"])
    if modality not in inputs:
        raise InputError(f"unknown modality '{modality}' (this model's inputs: {', '.join(inputs)})")
    if module.vae_names == ["concat"]:
        sizes = [int(s) for s in model.info["input_sizes"]]
        start = sum(sizes[:inputs.index(modality)])
        return 0, slice(start, start + sizes[inputs.index(modality)]), "concat"
    k = module.vae_names.index(modality)
    return k, slice(None), modality


def _space_for(model, modality: str, n_features: int):
    """The modality's space if the run knows it (``info['input_spaces']``, or the outcome's space
    when the sizes agree), else None (then the figure shows feature profiles)."""
    from ..data.spaces import space_from_dict

    saved = (model.info.get("input_spaces") or {}).get(modality)
    if saved is None and model.info.get("space") and n_features == int(model.info["n_outcome"]):
        saved = model.info["space"]
    if saved is None:
        return None
    space = space_from_dict(saved)
    return space if space.n_features == n_features else None


def _display(space, vectors: np.ndarray) -> np.ndarray | None:
    """(n, V) -> (n, H, W) images to show: the grid, or the volume's middle slice through the mask
    (last axis); None when the features are not on a 2-D/3-D grid."""
    grid_shape = getattr(space, "grid_shape", None) if space is not None else None
    if grid_shape is None or len(grid_shape) not in (2, 3):
        return None
    grids = space.to_grid(vectors)
    if len(grid_shape) == 3:
        mask = space.mask.reshape(grid_shape)
        occupied = np.flatnonzero(mask.any(axis=(0, 1)))
        grids = grids[..., int((occupied[0] + occupied[-1]) // 2)]
    return np.transpose(grids, (0, 2, 1))  # first axis left-right, second bottom-top (origin lower)


@torch.no_grad()
def traversal_images(model, modality: str, subset=None, sd: float = 2.0, steps: int = 5):
    """Decoded mean images along each deep latent axis, in the modality's image units.

    Returns (offsets (steps,), images (q, steps, V), centre (q,), spread (q,)). With ``subset``
    the traversal starts at the mean of the subjects' deep posterior means and moves
    ``offsets * spread_j`` along axis j, spread_j the sd of those means across subjects (so a
    collapsed latent, whose means do not vary, visibly changes nothing); without it, at the
    prior mean 0 with the prior sd 1. Each point z is decoded through the shared decoder's mean
    f(z) and the modality decoder's mean g_k(f(z)). Structures without the deep level
    (``separate``, ``concatenated``) traverse the shallow latent h instead.
    """
    module = _module(model)
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if not sd > 0:
        raise ValueError(f"sd must be positive, got {sd}")
    k, features, vae_name = _modality_decoder(module, model, modality)
    dim = module.cfg.deep_dim if module.hierarchical else module.cfg.shallow_dim
    if subset is not None:
        encoded = _encode_all(model, subset)[vae_name]
        means = encoded["deep_mean" if module.hierarchical else "shallow_mean"]
        centre = means.mean(axis=0)
        spread = means.std(axis=0) if len(means) > 1 else np.ones(dim)
    else:
        centre, spread = np.zeros(dim), np.ones(dim)
    offsets = np.linspace(-sd, sd, steps)
    points = np.repeat(centre[None, None, :], dim, axis=0).repeat(steps, axis=1)  # (dim, steps, dim)
    for j in range(dim):
        points[j, :, j] += offsets * spread[j]
    param = next(module.parameters())
    z = torch.as_tensor(points.reshape(-1, dim), dtype=param.dtype, device=param.device)
    was_training = module.training
    module.eval()
    try:
        h = module.shared_prior(z)[0] if module.hierarchical else z
        x = module.decode(k, h)[0][:, features].double().cpu().numpy()
    finally:
        module.train(was_training)
    st = model.standardizer
    x = x * st.input_scale[modality].astype(np.float64) + st.input_mean[modality].astype(np.float64)
    return offsets, x.reshape(dim, steps, -1), centre, spread


def latent_traversal(model, modality: str, out_png: str | Path, sd: float = 2.0, steps: int = 5, *,
                     subset=None, difference: bool = False) -> Path:
    """Figure of ``traversal_images``: rows = deep latent dims, columns = offsets -sd..+sd.

    Images are on the modality's grid (``model.info['space']`` when the modality shares the
    outcome's space, or ``model.info['input_spaces'][modality]``), a volume's middle slice;
    features without a grid are drawn as profiles. ``difference=True`` shows each image minus
    the row's centre image (what moving along the latent changes). PNG (Agg), written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    offsets, images, centre, spread = traversal_images(model, modality, subset=subset, sd=sd, steps=steps)
    dim, n_steps, n_features = images.shape
    if difference:
        reference = images[:, [n_steps // 2]] if n_steps % 2 else images.mean(axis=1, keepdims=True)
        images = images - reference
    space = _space_for(model, modality, n_features)
    shown = _display(space, images.reshape(-1, n_features))
    level = "deep" if _module(model).hierarchical else "shallow"
    fig = Figure(figsize=(1.8 * n_steps + 1.2, 1.6 * dim + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(dim, n_steps, squeeze=False)
    if shown is not None:
        shown = shown.reshape(dim, n_steps, *shown.shape[1:])
        if difference:
            bound = float(np.abs(shown).max()) or 1.0
            vmin, vmax, cmap = -bound, bound, "RdBu_r"
        else:
            vmin, vmax, cmap = float(shown.min()), float(shown.max()), "viridis"
        for j in range(dim):
            for s in range(n_steps):
                im = axes[j, s].imshow(shown[j, s], origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
                axes[j, s].set_xticks([]), axes[j, s].set_yticks([])
        fig.colorbar(im, ax=axes, shrink=0.6, label=f"{modality}{' change' if difference else ''}")
    else:
        low, high = float(images.min()), float(images.max())
        for j in range(dim):
            for s in range(n_steps):
                axes[j, s].plot(images[j, s], lw=0.6)
                axes[j, s].set_ylim(low, high)
                axes[j, s].set_xticks([])
    for s in range(n_steps):
        axes[0, s].set_title(f"{offsets[s]:+.1f} sd", fontsize=9)
    for j in range(dim):
        axes[j, 0].set_ylabel(f"{level} {j}\n(sd {spread[j]:.2g})", fontsize=8)
    fig.suptitle(f"{modality}: decoded along each {level} latent", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    out_png = Path(out_png)
    atomic_write_bytes(out_png, buffer.getvalue())
    return out_png
