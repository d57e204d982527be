#!/usr/bin/env python
"""Is a subject covariate encoded in the latent space? GLMs of the covariate on each latent.

For every latent mean column L_j of a latent table (`inva latents`, or inva_pyro.criticism.latents.write_latents),
fits the GLM (statsmodels)

    g(E[covariate_i]) = b0 + b_j * Lz_ij [+ nuisance covariates],   Lz_j = (L_j - mean) / sd

with the covariate as the response and one standardised latent as the predictor: the question
"is latent j associated with the covariate" is the Wald test of b_j = 0, and the covariate as
the response is what lets a binary covariate (diagnosis, site) be modelled with the logit link
(family binomial) as the tutorial suggests. b_j is the change in the covariate's linear
predictor per sd of the latent (gaussian: covariate units; binomial: log-odds). For the
gaussian family the test is the same t-test as the reverse regression of the latent on the
covariate. p-values are corrected over all latents with Benjamini-Hochberg (FDR).

`--joint` also tests each block of latents jointly (per modality and level, e.g. gm_deep, and
all mean columns together): covariate ~ all latents of the block, against the model without
them, by a likelihood-ratio test (binomial: chi^2; gaussian: the F test), BH-corrected over
blocks. It finds a covariate spread over several latents that no single one carries.

Writes (into --out): glm_{COV}.csv and .md (estimate, SE, z or t, p, p_fdr, significant), and
with --joint glm_{COV}_joint.csv and .md. Prints the latents significant at --alpha (FDR).

Examples:
    inva latents --run run --manifest cohort/manifest.csv --out latents.csv
    python analysis/latent_glm.py --latents latents.csv --manifest cohort/manifest.csv --covariate age --out glm
    python analysis/latent_glm.py --latents latents.csv --manifest dx.csv --covariate diagnosis \\
        --family binomial --positive AD --adjust age,site --joint --out glm
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

SUBJECT = "subject"
MEAN_COLUMN = re.compile(r"^(?P<block>.+_(shallow|deep|joint))_mean_(?P<j>\d+)$")


class UsageError(Exception):
    """A problem with the user's files or arguments: reported as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latent_glm.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", required=True, type=Path, help="latent table CSV (a 'subject' column, "
                   "then {modality}_{shallow|deep}_{mean|sd}_{j} columns)")
    p.add_argument("--manifest", required=True, type=Path, help="CSV with a 'subject' column and the covariate")
    p.add_argument("--covariate", required=True, help="the manifest column to explain (the GLM's response)")
    p.add_argument("--family", choices=["gaussian", "binomial"], default="gaussian",
                   help="gaussian (identity link; continuous covariate, default) or binomial (logit link; "
                        "two-level covariate)")
    p.add_argument("--positive", help="binomial: the covariate level coded 1 (default: 1 for 0/1 columns, "
                   "else the larger of the two levels in sort order)")
    p.add_argument("--adjust", default="", help="comma-separated numeric manifest columns added as nuisance "
                   "predictors to every model (e.g. age,site)")
    p.add_argument("--columns", default=MEAN_COLUMN.pattern,
                   help="regular expression selecting the latent columns to test (default: every *_mean_j)")
    p.add_argument("--alpha", type=float, default=0.05, help="FDR level (default 0.05)")
    p.add_argument("--joint", action="store_true", help="also test each block of latents jointly (LR test)")
    p.add_argument("--out", type=Path, help="output folder (default: print only)")
    args = p.parse_args(argv)
    if not 0 < args.alpha < 1:
        p.error(f"--alpha must be in (0, 1), got {args.alpha}")
    return args


# --------------------------------------------------------------------------- data


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise UsageError(f"{path}: {what} not found")
    try:
        table = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for a broken file
        raise UsageError(f"{path}: cannot read the {what} as CSV ({type(exc).__name__})") from None
    if SUBJECT not in table.columns:
        raise UsageError(f"{path}: the {what} has no '{SUBJECT}' column")
    table[SUBJECT] = table[SUBJECT].astype(str)
    if table[SUBJECT].duplicated().any():
        first = table[SUBJECT][table[SUBJECT].duplicated()].iloc[0]
        raise UsageError(f"{path}: subject '{first}' appears more than once in the {what}")
    return table.set_index(SUBJECT)


def _response(values: pd.Series, family: str, positive: str | None, where: str) -> pd.Series:
    if family == "gaussian":
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.isna().any():
            raise UsageError(f"{where}: family gaussian needs a numeric covariate")
        if numeric.nunique() < 2:
            raise UsageError(f"{where}: the covariate is constant over the matched subjects")
        return numeric.astype(float)
    levels = sorted(values.astype(str).unique())
    if len(levels) != 2:
        raise UsageError(f"{where}: family binomial needs exactly two levels, found {len(levels)} "
                         f"({', '.join(levels[:5])})")
    numeric = pd.to_numeric(values, errors="coerce")
    zero_one = bool(numeric.notna().all()) and set(numeric.unique()) == {0.0, 1.0}
    if positive is None:
        return numeric.astype(float) if zero_one else (values.astype(str) == levels[1]).astype(float)
    if zero_one and positive in ("0", "1"):
        return (numeric == float(positive)).astype(float)
    if positive not in levels:
        raise UsageError(f"{where}: --positive {positive} is not a level of the covariate ({', '.join(levels)})")
    return (values.astype(str) == positive).astype(float)


def load_data(args) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame, list[str]]:
    """(latents, response, nuisance, latent columns) on the subjects present in both files."""
    latents = _read_csv(args.latents, "latent table")
    manifest = _read_csv(args.manifest, "manifest")
    if args.covariate not in manifest.columns:
        raise UsageError(f"{args.manifest}: no column '{args.covariate}' (columns: {', '.join(manifest.columns)})")
    adjust = [c.strip() for c in args.adjust.split(",") if c.strip()]
    for column in adjust:
        if column not in manifest.columns:
            raise UsageError(f"{args.manifest}: no column '{column}' (--adjust)")
        if column == args.covariate:
            raise UsageError(f"--adjust {column}: the covariate cannot adjust for itself")
    try:
        pattern = re.compile(args.columns)
    except re.error as exc:
        raise UsageError(f"--columns: not a regular expression ({exc})") from None
    columns = [c for c in latents.columns if pattern.search(c)]
    if not columns:
        raise UsageError(f"{args.latents}: no latent column matches '{args.columns}'")
    shared = [s for s in latents.index if s in manifest.index]
    wanted = manifest.loc[shared, [args.covariate, *adjust]]
    keep = wanted.notna().all(axis=1)
    shared = [s for s, k in zip(shared, keep) if k]
    if len(shared) < 3:
        raise UsageError(f"{args.manifest}: only {len(shared)} subject(s) of the latent table have the "
                         "covariate; need at least 3")
    raw = latents.loc[shared, columns]
    latent_values = raw.apply(pd.to_numeric, errors="coerce")
    if (latent_values.isna() & raw.notna()).any().any():
        raise UsageError(f"{args.latents}: non-numeric latent values")
    # Empty cells: the subject lacks that input (`inva latents`); each test uses the subjects that have it.
    response = _response(manifest.loc[shared, args.covariate], args.family, args.positive, str(args.manifest))
    nuisance = manifest.loc[shared, adjust].apply(pd.to_numeric, errors="coerce")
    if nuisance.isna().any().any():
        raise UsageError(f"{args.manifest}: --adjust columns must be numeric")
    return latent_values, response, nuisance, columns


# --------------------------------------------------------------------------- models


def _design(nuisance: pd.DataFrame, extra: pd.DataFrame | None = None) -> pd.DataFrame:
    import statsmodels.api as sm

    parts = [nuisance] + ([extra] if extra is not None else [])
    X = pd.concat(parts, axis=1) if parts else pd.DataFrame(index=nuisance.index)
    return sm.add_constant(X, has_constant="add")


def _standardise(column: pd.Series) -> pd.Series:
    sd = column.std()
    return (column - column.mean()) / (sd if sd > 0 else 1.0)


def _fit(y: pd.Series, X: pd.DataFrame, family: str):
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

    fam = sm.families.Gaussian() if family == "gaussian" else sm.families.Binomial()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (ConvergenceWarning, PerfectSeparationWarning, RuntimeWarning))
        try:
            return sm.GLM(y, X, family=fam).fit()
        except Exception:  # perfect separation errors in older statsmodels
            return None


def per_latent(latents: pd.DataFrame, y: pd.Series, nuisance: pd.DataFrame, columns: list[str],
               family: str, alpha: float) -> pd.DataFrame:
    """One GLM per latent column: the latent's coefficient, SE, z/t, p and BH-corrected p."""
    rows = []
    for column in columns:
        ok = latents[column].notna()  # subjects lacking the input have no value for its latents
        n = int(ok.sum())
        fit = _fit(y[ok], _design(nuisance[ok], _standardise(latents.loc[ok, column]).rename("latent").to_frame()),
                   family) if n >= 3 else None
        if fit is None or not np.isfinite(fit.bse["latent"]):
            rows.append({"latent": column, "n": n, "estimate": np.nan, "se": np.nan, "stat": np.nan, "p": np.nan})
            continue
        rows.append({"latent": column, "n": n, "estimate": float(fit.params["latent"]), "se": float(fit.bse["latent"]),
                     "stat": float(fit.tvalues["latent"]), "p": float(fit.pvalues["latent"])})
    table = pd.DataFrame(rows)
    with_fdr(table, alpha)
    return table


def with_fdr(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Add Benjamini-Hochberg adjusted p-values (``p_fdr``) over the rows with a p-value, and ``significant``."""
    from statsmodels.stats.multitest import multipletests

    table["p_fdr"] = np.nan
    ok = table["p"].notna().to_numpy()
    if ok.any():
        table.loc[ok, "p_fdr"] = multipletests(table.loc[ok, "p"], alpha=alpha, method="fdr_bh")[1]
    table["significant"] = table["p_fdr"] < alpha
    return table


def _blocks(columns: list[str]) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    for column in columns:
        match = MEAN_COLUMN.match(column)
        if match:
            blocks.setdefault(match.group("block"), []).append(column)
    if len(blocks) != 1 or len(next(iter(blocks.values()))) != len(columns):
        blocks["all"] = list(columns)
    return blocks


def joint(latents: pd.DataFrame, y: pd.Series, nuisance: pd.DataFrame, columns: list[str],
          family: str, alpha: float) -> pd.DataFrame:
    """Likelihood-ratio test of each block of latents (covariate ~ block) against no latents."""
    from scipy import stats

    rows = []
    for block, cols in _blocks(columns).items():
        ok = latents[cols].notna().all(axis=1)  # the subjects with every latent of the block
        n = int(ok.sum())
        null = _fit(y[ok], _design(nuisance[ok]), family) if n >= 3 else None
        X = _design(nuisance[ok], latents.loc[ok, cols].apply(_standardise))
        df_model = len(cols)
        row = {"block": block, "n": n, "n_latents": df_model, "stat": np.nan, "df": np.nan, "p": np.nan,
               "test": "F" if family == "gaussian" else "LR chi2"}
        fit = _fit(y[ok], X, family) if n - X.shape[1] >= 2 else None
        if fit is not None and null is not None:
            if family == "gaussian":
                resid_df = n - X.shape[1]
                stat = ((null.deviance - fit.deviance) / df_model) / (fit.deviance / resid_df)
                row.update(stat=float(stat), df=f"{df_model},{resid_df}", p=float(stats.f.sf(stat, df_model, resid_df)))
            else:
                stat = max(null.deviance - fit.deviance, 0.0)
                row.update(stat=float(stat), df=df_model, p=float(stats.chi2.sf(stat, df_model)))
        rows.append(row)
    table = pd.DataFrame(rows)
    with_fdr(table, alpha)
    return table


# --------------------------------------------------------------------------- output


def _markdown(table: pd.DataFrame, title: str, note: str) -> str:
    def cell(value) -> str:
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else ""
        if isinstance(value, (float, np.floating)):
            if not np.isfinite(value):
                return "n/a"
            return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
        return str(value)

    lines = [f"# {title}", "", note, "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, covariate: str, table: pd.DataFrame, joint_table: pd.DataFrame | None,
                  note: str) -> list[Path]:
    from inva_pyro.data.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", covariate)
    written = []
    for suffix, frame, title in (("", table, f"GLM of {covariate} on each latent"),
                                 ("_joint", joint_table, f"Joint tests of {covariate} on blocks of latents")):
        if frame is None:
            continue
        csv_path, md_path = out / f"glm_{safe}{suffix}.csv", out / f"glm_{safe}{suffix}.md"
        atomic_write_text(csv_path, frame.to_csv(index=False, float_format="%.6g"))
        atomic_write_text(md_path, _markdown(frame, title, note))
        written += [csv_path, md_path]
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        latents, y, nuisance, columns = load_data(args)
    except UsageError as exc:
        print(f"latent_glm.py: error: {exc}", file=sys.stderr)
        return 2
    table = per_latent(latents, y, nuisance, columns, args.family, args.alpha)
    joint_table = joint(latents, y, nuisance, columns, args.family, args.alpha) if args.joint else None
    stat = "t" if args.family == "gaussian" else "z"
    adjust = f", adjusted for {args.adjust}" if args.adjust else ""
    note = (f"family {args.family}, {len(y)} subjects{adjust}; estimate = change in the covariate's linear "
            f"predictor per sd of the latent; stat = Wald {stat}; p_fdr = Benjamini-Hochberg over "
            f"{int(table['p'].notna().sum())} latents; significant at FDR {args.alpha:g}.")
    if args.out is not None:
        for path in write_outputs(args.out, args.covariate, table, joint_table, note):
            print(f"wrote {path}")
    hits = table[table["significant"]]
    if len(hits):
        print(f"{args.covariate}: {len(hits)} of {len(table)} latents significant at FDR {args.alpha:g}: "
              + ", ".join(f"{r.latent} (p_fdr {r.p_fdr:.2g})" for r in hits.itertuples()))
    else:
        print(f"{args.covariate}: no latent significant at FDR {args.alpha:g} "
              f"(smallest p_fdr {table['p_fdr'].min():.2g})")
    if joint_table is not None:
        for r in joint_table.itertuples():
            print(f"  joint {r.block}: {r.test} {r.stat:.3g}, p_fdr {r.p_fdr:.2g}"
                  + (" (significant)" if r.significant else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
