"""A cohort manifest (CONTRACT.md) from a BIDS dataset and its derivatives, with pybids.

Each image column is named by the user together with the BIDS entities that select its file
(``gm=space-MNI152NLin2009cAsym,label-GM,suffix-probseg``). pybids indexes the raw dataset and
every derivatives dataset (fMRIPrep, FreeSurfer, PETPrep outputs); this module only turns its
matches into rows, one per subject, or one per subject and session where sessions exist.

Choices a user should know (docs/bids_to_tuned.md):
- Row ids: ``sub-01`` without sessions, ``sub-01_ses-1`` with them, so that the manifest's
  ``subject`` column stays unique; ``bids_subject`` and ``session`` columns say where it came from.
- A file without a session entity (fMRIPrep's longitudinal anatomy) serves every session of its
  subject.
- Without an ``extension`` entity only image files count (NIfTI, GIfTI), so JSON sidecars that
  share the entities are not matches.
- An empty cell means the subject lacks the image; two matching files for one row, or none for
  any row, are errors: the entity set is ambiguous or wrong.
"""
from __future__ import annotations

import difflib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import InputError
from .io import atomic_write_text

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".gii")
RESERVED_COLUMNS = ("subject", "split", "bids_subject", "session")
# Entities that define rows rather than select files.
ROW_ENTITIES = ("subject",)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ImageSpec:
    """One ``--image NAME=ENTITIES`` argument: a manifest column and its pybids filters."""
    name: str
    filters: dict[str, str]
    text: str


@dataclass
class BidsManifest:
    """The manifest table (paths absolute) and, per image column, the row ids lacking it."""
    table: pd.DataFrame
    missing: dict[str, list[str]]

    def summary(self) -> list[str]:
        """One line per image column with empty cells (a subject lacking that image)."""
        lines = []
        for name, rows in self.missing.items():
            if rows:
                shown = ", ".join(rows[:5]) + (", ..." if len(rows) > 5 else "")
                lines.append(f"{name}: missing for {len(rows)} of {len(self.table)} rows ({shown})")
        return lines


def parse_image_spec(text: str) -> ImageSpec:
    """``NAME=key-value,key-value,...`` as typed on the command line."""
    name, sep, entities = text.partition("=")
    name = name.strip()
    if not sep or not _NAME.match(name):
        raise InputError(f"--image {text}: expected NAME=ENTITIES, e.g. gm=space-MNI152NLin2009cAsym,label-GM,"
                         "suffix-probseg (NAME: a letter, then letters, digits or _)")
    if name in RESERVED_COLUMNS:
        raise InputError(f"--image {text}: '{name}' is a reserved manifest column; choose another name")
    filters: dict[str, str] = {}
    for pair in (p.strip() for p in entities.split(",")):
        key, dash, value = pair.partition("-")
        if not dash or not key or not value:
            raise InputError(f"--image {text}: '{pair}' is not an entity of the form key-value")
        if key in filters:
            raise InputError(f"--image {text}: entity '{key}' given twice")
        filters[key] = value
    return ImageSpec(name, filters, text)


def open_layout(root: Path, derivatives: list[Path] | None = None):
    """pybids' index of ``root`` and its derivatives (``root/derivatives`` and ``derivatives``).

    The root must be a BIDS dataset (a ``dataset_description.json`` with the mandatory fields:
    pybids' own check); files are not validated one by one, so derivatives and extra files are
    indexed too. Metadata sidecars are not read: the manifest needs paths only. Nothing here
    touches the network.
    """
    from bids import BIDSLayout
    from bids.exceptions import BIDSDerivativesValidationError, BIDSValidationError
    from bids.layout import BIDSLayoutIndexer

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: BIDS dataset folder not found")
    paths = [root / "derivatives"] if (root / "derivatives").is_dir() else []
    for path in derivatives or []:
        if not (Path(path) / "dataset_description.json").is_file():
            raise InputError(f"{path}: not a BIDS derivatives dataset (no dataset_description.json)")
        paths.append(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no valid derivatives found" is not an error here
            return BIDSLayout(root, validate=True, derivatives=paths or False,
                              indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
    except BIDSDerivativesValidationError as exc:
        raise InputError(f"{root}: a derivatives dataset is not valid ({_first_sentence(exc)})") from None
    except BIDSValidationError as exc:
        raise InputError(f"{root}: not a BIDS dataset ({_first_sentence(exc)})") from None


def build_manifest(root: Path, specs: list[ImageSpec], derivatives: list[Path] | None = None) -> BidsManifest:
    """Rows of subjects (and sessions), one column per image spec, ``participants.tsv`` joined."""
    root = Path(root)
    names = [s.name for s in specs]
    if not specs:
        raise InputError(f"{root}: give at least one --image NAME=ENTITIES")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--image {twice[0]}: column named twice")
    layout = open_layout(root, derivatives)
    rows = _rows(layout)
    columns = {spec.name: _match(layout, spec, rows, root) for spec in specs}
    has_sessions = any(session is not None for _, session in rows)
    table = pd.DataFrame({"subject": [_row_id(s, ses) for s, ses in rows]})
    if has_sessions:
        table["bids_subject"] = [f"sub-{s}" for s, _ in rows]
        table["session"] = [ses or "" for _, ses in rows]
    for name, cells in columns.items():
        table[name] = cells
    table = _join_participants(table, root, [f"sub-{s}" for s, _ in rows])
    missing = {name: [rid for rid, cell in zip(table["subject"], cells) if not cell] for name, cells in columns.items()}
    return BidsManifest(table, missing)


def write_manifest(manifest: BidsManifest, out: Path) -> Path:
    """Write the CSV atomically; image paths inside the CSV's folder become relative to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent.resolve()
    table = manifest.table.copy()
    for name in manifest.missing:
        table[name] = [_portable(cell, folder) for cell in table[name]]
    atomic_write_text(out, table.to_csv(index=False))
    return out


def _rows(layout) -> list[tuple[str, str | None]]:
    """(subject, session or None) for every subject pybids found, sessions where it has them."""
    rows = []
    for subject in sorted(layout.get_subjects()):
        sessions = sorted(layout.get_sessions(subject=subject))
        rows += [(subject, ses) for ses in sessions] if sessions else [(subject, None)]
    return rows


def _row_id(subject: str, session: str | None) -> str:
    return f"sub-{subject}" if session is None else f"sub-{subject}_ses-{session}"


def _match(layout, spec: ImageSpec, rows, root: Path) -> list[str]:
    """The file of each row for one image spec ('' where none); errors on ambiguity or no match."""
    known = set(layout.get_entities())
    for key in spec.filters:
        if key in ROW_ENTITIES:
            raise InputError(f"--image {spec.text}: '{key}' selects rows, not files; leave it out")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"--image {spec.text}: unknown BIDS entity '{key}'{hint}")
    files = layout.get(return_type="object", **spec.filters)
    if "extension" not in spec.filters:
        files = [f for f in files if f.path.endswith(IMAGE_EXTENSIONS)]
    by_row: dict[tuple[str, str | None], list[str]] = {}
    for f in files:
        entities = f.get_entities()
        if "subject" in entities:  # group-level files (templates, atlases) belong to no row
            by_row.setdefault((entities["subject"], entities.get("session")), []).append(f.path)
    if not by_row:
        raise InputError(f"{root}: --image {spec.text} matches no file (derivatives included)")
    cells = []
    for subject, session in rows:
        found = by_row.get((subject, session), []) + (by_row.get((subject, None), []) if session else [])
        if len(found) > 1:
            listed = ", ".join(os.path.relpath(p, root) for p in sorted(found)[:3])
            raise InputError(f"{root}: --image {spec.text} matches {len(found)} files of "
                             f"{_row_id(subject, session)} ({listed}); add entities to select one")
        cells.append(found[0] if found else "")
    return cells


def _join_participants(table: pd.DataFrame, root: Path, participant_ids: list[str]) -> pd.DataFrame:
    """Every column of ``participants.tsv`` (age, sex, group, ...) joined by participant id."""
    path = root / "participants.tsv"
    if not path.is_file():
        return table
    try:
        participants = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable TSV file ({_first_sentence(exc)})") from None
    if "participant_id" not in participants:
        raise InputError(f"{path}: no 'participant_id' column")
    clash = [c for c in participants.columns if c != "participant_id" and c in table.columns]
    if clash:
        raise InputError(f"{path}: column '{clash[0]}' has the name of a manifest column; rename the image")
    ids = participants["participant_id"].str.strip()
    participants.index = ids.where(ids.str.startswith("sub-"), "sub-" + ids)
    if participants.index.duplicated().any():
        raise InputError(f"{path}: participant '{participants.index[participants.index.duplicated()][0]}' "
                         "is listed twice")
    covariates = participants.drop(columns="participant_id").reindex(participant_ids)
    return pd.concat([table, covariates.reset_index(drop=True)], axis=1)


def _portable(cell: str, folder: Path) -> str:
    if not cell:
        return ""
    path = Path(cell).resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text.split(". ")[0].rstrip(".")
