"""A cohort manifest (docs/cohorts.md) from a BIDS dataset and its derivatives, with pybids.

Each image column is named by the user together with the BIDS entities that select its file
(``gm=space-MNI152NLin2009cAsym,label-GM,suffix-probseg``; keys as file names show them, ``acq``,
or as pybids names them, ``acquisition``: bids_entities.py). pybids indexes the raw dataset and
every derivatives dataset (fMRIPrep, FreeSurfer, PETPrep outputs); this module only turns its
matches into rows, one per subject, or one per subject and session where sessions exist.

Choices a user should know (docs/bids_to_tuned.md):
- Row ids: ``sub-01`` without sessions, ``sub-01_ses-1`` with them, so that the manifest's
  ``subject`` column stays unique; ``bids_subject`` and ``session`` columns say where it came from.
- A file without a session entity (fMRIPrep's longitudinal anatomy) serves every session of its
  subject.
- Without an ``extension`` entity only image files count (NIfTI, GIfTI), so JSON sidecars that
  share the entities are not matches.
- An empty cell means the subject lacks the image; a row with no image at all (an MEG session, an
  empty-room recording) is left out and named in the summary. Two matching files for one row, or
  none for any row, are errors: the entity set is ambiguous or wrong.
- Images are opened for their headers; unreadable ones are listed (bids_checks.py), or refused
  with ``strict``.
"""
from __future__ import annotations

import difflib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import InputError
from .bids_checks import mixed_kinds, plural, screen_derivatives, unreadable_images
from .bids_entities import ABSENT, ROW_ENTITIES, entity_name, query_value, shown_key
from .io import atomic_write_text

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".gii")
RESERVED_COLUMNS = ("subject", "split", "bids_subject", "session")
SHOWN = 3  # paths named in one summary line or error before "and N more"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
Row = tuple[str, "str | None"]  # (subject label, session label or None)


@dataclass(frozen=True)
class ImageSpec:
    """One ``--image NAME=ENTITIES`` argument: a manifest column and its filters by pybids entity name."""
    name: str
    filters: dict[str, str]
    text: str


@dataclass
class BidsManifest:
    """The manifest table (paths absolute), the row ids lacking each image, and what was left out."""
    table: pd.DataFrame
    missing: dict[str, list[str]]
    root: Path = Path(".")
    left_out: list[str] = field(default_factory=list)
    unused_derivatives: list[tuple[Path, str]] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """Lines for the user: derivatives not indexed, rows left out, empty cells, mixed kinds, bad images."""
        lines = []
        if self.unused_derivatives:
            lines.append("derivatives not used: " + ", ".join(f"{_shown_path(p, self.root)} ({why})"
                                                            for p, why in self.unused_derivatives))
        lines += self.left_out
        for name, rows in self.missing.items():
            if rows:
                lines.append(f"{name}: missing for {len(rows)} of {len(self.table)} rows ({_first(rows, 5)})")
        lines += self.mixed
        if self.unreadable:
            lines.append(f"{plural(len(self.unreadable), 'image')} nibabel cannot read: " + (
                "the manifest keeps it, but inva fit will refuse its row; fix the file or drop the row"
                if len(self.unreadable) == 1 else "the manifest keeps them, but inva fit will refuse these rows "
                "(it stops at the first); fix the files or drop the rows") + " (--strict: stop here instead)")
            listed = list(self.unreadable.items())
            lines += [f"  {_shown_path(path, self.root)}: {why}" for path, why in listed[:SHOWN]]
            if len(listed) > SHOWN:
                lines.append(f"  ... and {len(listed) - SHOWN} more")
        return lines


def parse_image_spec(text: str) -> ImageSpec:
    """``NAME=key-value,key-value,...`` as typed on the command line; keys become pybids' names."""
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
        entity = entity_name(key, text)
        if entity in ROW_ENTITIES:
            raise InputError(f"--image {text}: '{key}' selects rows, not files; leave it out "
                             "(--exclude-subjects drops subjects)")
        if entity in filters:
            raise InputError(f"--image {text}: entity '{key}' given twice")
        filters[entity] = value
    return ImageSpec(name, filters, text)


def open_layout(root: Path, derivatives: list[Path]):
    """pybids' index of ``root`` and of the derivatives datasets ``derivatives`` (screened already).

    The root must be a BIDS dataset (a ``dataset_description.json`` with the mandatory fields:
    pybids' own check); files are not validated one by one, so derivatives and extra files are
    indexed too. Metadata sidecars are not read: the manifest needs paths only. Nothing here
    touches the network.
    """
    from bids import BIDSLayout
    from bids.exceptions import BIDSDerivativesValidationError, BIDSValidationError
    from bids.layout import BIDSLayoutIndexer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # unused derivatives are named in the summary instead
            return BIDSLayout(root, validate=True, derivatives=[str(p) for p in derivatives] or False,
                              indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
    except BIDSDerivativesValidationError as exc:
        raise InputError(f"{root}: a derivatives dataset is not valid ({_first_sentence(exc)})") from None
    except BIDSValidationError as exc:
        raise InputError(f"{root}: not a BIDS dataset ({_first_sentence(exc)})") from None


def build_manifest(root: Path, specs: list[ImageSpec], derivatives: list[Path] | None = None,
                   sessions: list[str] | None = None, exclude_subjects: list[str] | None = None,
                   strict: bool = False) -> BidsManifest:
    """Rows of subjects (and sessions), one column per image spec, ``participants.tsv`` joined.

    ``sessions`` keeps those sessions' rows only; ``exclude_subjects`` drops subjects (labels,
    ``sub-`` optional; comma-separated lists accepted). ``strict`` makes unreadable images an error.
    """
    root = Path(root)
    names = [s.name for s in specs]
    if not specs:
        raise InputError(f"{root}: give at least one --image NAME=ENTITIES")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--image {twice[0]}: column named twice")
    if not root.is_dir():
        raise InputError(f"{root}: BIDS dataset folder not found")
    used, unused = screen_derivatives(root, [Path(p) for p in derivatives or []])
    layout = open_layout(root, used)
    rows, left_out = _rows(layout, root, _labels(sessions, "ses-"), _labels(exclude_subjects, "sub-"))
    columns = {spec.name: _match(layout, spec, rows, root, unused) for spec in specs}
    rows, columns, dropped = _drop_rows_without_images(rows, columns)
    manifest = BidsManifest(_table(root, rows, columns), {}, root, left_out + dropped, unused)
    for spec in specs:
        cells = columns[spec.name]
        manifest.missing[spec.name] = [_row_id(*row) for row, f in zip(rows, cells) if f is None]
        manifest.mixed += mixed_kinds(spec.name, [f and f.get_entities() for f in cells], set(spec.filters),
                                      shown_key)
    manifest.unreadable = unreadable_images([f.path for cells in columns.values() for f in cells if f])
    if strict and manifest.unreadable:
        listed = "; ".join(f"{_shown_path(p, root)}: {why}" for p, why in list(manifest.unreadable.items())[:SHOWN])
        more = len(manifest.unreadable) - SHOWN
        raise InputError(f"{root}: {plural(len(manifest.unreadable), 'image')} nibabel cannot read (--strict): "
                         f"{listed}" + (f"; and {more} more" if more > 0 else ""))
    return manifest


def write_manifest(manifest: BidsManifest, out: Path) -> Path:
    """Write the CSV atomically; image paths inside the CSV's folder become relative to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = manifest.table.copy()
    for name in manifest.missing:
        table[name] = [_portable(cell, out.parent) for cell in table[name]]
    atomic_write_text(out, table.to_csv(index=False))
    return out


def _labels(values: list[str] | None, prefix: str) -> list[str]:
    """Labels from repeatable, comma-separated options, with the ``sub-``/``ses-`` prefix optional."""
    labels = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    return list(dict.fromkeys(v.removeprefix(prefix) for v in labels))


def _rows(layout, root: Path, sessions: list[str], excluded: list[str]) -> tuple[list[Row], list[str]]:
    """(subject, session or None) rows, sessions where a subject has them; and lines on who was left out."""
    subjects = sorted(layout.get_subjects())
    for label in excluded:
        if label not in subjects:
            close = difflib.get_close_matches(label, subjects, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"{root}: --exclude-subjects {label}: no subject sub-{label}{hint}")
    known_sessions = sorted(layout.get_sessions())
    for label in sessions:
        if label not in known_sessions:
            same = [s for s in known_sessions if s.lower() == label.lower()]
            listed = f"sessions: {', '.join(known_sessions)}" if known_sessions else "the dataset has no sessions"
            hint = f"; labels are case-sensitive: did you mean '{same[0]}'?" if same else ""
            raise InputError(f"{root}: --session {label}: no subject has session ses-{label} ({listed}{hint})")
    rows: list[Row] = []
    without = []
    for subject in (s for s in subjects if s not in excluded):
        found = sorted(layout.get_sessions(subject=subject))
        kept = [ses for ses in found if ses in sessions] if sessions else found
        if sessions and not kept:
            without.append(f"sub-{subject}")
        rows += [(subject, ses) for ses in kept] if (kept or sessions) else [(subject, None)]
    left_out = [f"left out by --exclude-subjects: {', '.join('sub-' + s for s in excluded)}"] if excluded else []
    if without:
        left_out.append(f"left out {plural(len(without), 'subject')} without session "
                        f"{' or '.join(sessions)}: {_first(without, 5)}")
    return rows, left_out


def _row_id(subject: str, session: str | None) -> str:
    return f"sub-{subject}" if session is None else f"sub-{subject}_ses-{session}"


def _match(layout, spec: ImageSpec, rows: list[Row], root: Path, unused) -> list:
    """The file (pybids BIDSFile) of each row for one image spec (None where none); errors on ambiguity or no match."""
    indexed = set(layout.get_entities())
    query = {}
    for name, value in spec.filters.items():
        if name not in indexed and value != ABSENT:  # e.g. desc with no derivatives indexed: no file has it
            raise InputError(f"{root}: --image {spec.text} matches no file ({_no_match_hints(layout, spec, unused)})")
        if name in indexed:  # an entity no indexed file can have is absent everywhere: nothing to filter
            query[name] = query_value(value)
    files = layout.get(return_type="object", **query)
    if "extension" not in spec.filters:
        files = [f for f in files if f.path.endswith(IMAGE_EXTENSIONS)]
    by_row: dict[Row, list] = {}
    for f in files:
        entities = f.get_entities()
        if "subject" in entities:  # group-level files (templates, atlases) belong to no row
            by_row.setdefault((entities["subject"], entities.get("session")), []).append(f)
    if not by_row:
        raise InputError(f"{root}: --image {spec.text} matches no file ({_no_match_hints(layout, spec, unused)})")
    cells = []
    for subject, session in rows:
        found = by_row.get((subject, session), []) + (by_row.get((subject, None), []) if session else [])
        if len(found) > 1:
            found.sort(key=lambda f: f.path)
            listed = ", ".join(os.path.relpath(f.path, root) for f in found[:SHOWN])
            raise InputError(f"{root}: --image {spec.text} matches {len(found)} files of "
                             f"{_row_id(subject, session)} ({listed}){_difference_hint(found)}")
        cells.append(found[0] if found else None)
    if all(cell is None for cell in cells):
        raise InputError(f"{root}: --image {spec.text} matches no file of the rows kept "
                         f"(only {_first(sorted(_row_id(*r) for r in by_row), SHOWN)}); check --session "
                         "and --exclude-subjects")
    return cells


def _no_match_hints(layout, spec: ImageSpec, unused) -> str:
    """Why nothing matched: a value no file has (values are case-sensitive), derivatives not indexed."""
    indexed = set(layout.get_entities())
    hints = []
    for name, value in spec.filters.items():
        key = shown_key(name)
        if value == ABSENT:
            continue
        if name not in indexed:
            hints.append(f"no indexed file has a {key}- entity")
            continue
        images = {} if "extension" in spec.filters else {"extension": list(IMAGE_EXTENSIONS)}
        values = layout.get(return_type="id", target=name, **images)
        if not any(_same_value(v, value) for v in values):
            shown = sorted(str(v) for v in values)
            same = [v for v in shown if v.lower() == value.lower()]
            known = f"did you mean {key}-{same[0]}?" if same else f"{key} values here: {_first(shown, 6)}"
            case = "values are case-sensitive, " if value.lower() != value.upper() else ""
            hints.append(f"no {'file' if 'extension' in spec.filters else 'image'} has {key}-{value}; {case}{known}")
    if not hints:
        hints.append("no file has all of these entities" + ("" if "extension" in spec.filters
                                                             else " with an image extension (.nii, .nii.gz, .gii)"))
    hints.append("derivatives included")
    if unused:
        hints.append("derivatives not used: " + ", ".join(f"{p.name} ({why})" for p, why in unused))
    return "; ".join(hints)


def _same_value(indexed, typed: str) -> bool:
    """Whether pybids' value ``indexed`` is the typed one; numbers as pybids compares them (run-1 is run-01)."""
    if isinstance(indexed, int) and typed.isdigit():
        return indexed == int(typed)
    return str(indexed) == typed


def _difference_hint(found: list) -> str:
    """The entities that tell a row's matching files apart, and one to add: '; they differ in desc (none, preproc)'."""
    entities = [f.get_entities() for f in found]
    differing = []
    for name in sorted({n for e in entities for n in e} - {"subject"}):
        values = sorted({str(e[name]) if name in e else ABSENT for e in entities})
        if len(values) > 1:
            differing.append((shown_key(name), values))
    if not differing:
        return "; add entities to select one"
    key, values = next(((k, v) for k, v in differing if ABSENT in v), differing[0])
    listed = ", ".join(f"{k} ({', '.join(v)})" for k, v in differing)
    return f"; they differ in {listed}: add one to select a file, e.g. {key}-{values[0]}"


def _drop_rows_without_images(rows: list[Row], columns: dict[str, list]) -> tuple[list[Row], dict, list[str]]:
    """Rows with at least one image; lines naming the subjects and sessions left out for having none."""
    keep = [any(cells[i] is not None for cells in columns.values()) for i in range(len(rows))]
    kept_subjects = {s for (s, _), k in zip(rows, keep) if k}
    empty_subjects = sorted({f"sub-{s}" for s, _ in rows} - {f"sub-{s}" for s in kept_subjects})
    empty_rows = [_row_id(s, ses) for (s, ses), k in zip(rows, keep) if not k and s in kept_subjects]
    lines = []
    if empty_subjects:
        lines.append(f"left out {plural(len(empty_subjects), 'subject')} without any image: "
                     f"{_first(empty_subjects, 5)}")
    if empty_rows:
        lines.append(f"left out {plural(len(empty_rows), 'session row')} without any image: {_first(empty_rows, 5)}")
    columns = {name: [c for c, k in zip(cells, keep) if k] for name, cells in columns.items()}
    return [r for r, k in zip(rows, keep) if k], columns, lines


def _table(root: Path, rows: list[Row], columns: dict[str, list]) -> pd.DataFrame:
    """The manifest's columns: row ids, BIDS subject and session where there are sessions, images, covariates."""
    table = pd.DataFrame({"subject": [_row_id(s, ses) for s, ses in rows]})
    if any(session is not None for _, session in rows):
        table["bids_subject"] = [f"sub-{s}" for s, _ in rows]
        table["session"] = [ses or "" for _, ses in rows]
    for name, cells in columns.items():
        table[name] = [f.path if f else "" for f in cells]
    return _join_participants(table, root, [f"sub-{s}" for s, _ in rows])


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
    return _shown_path(cell, folder) if cell else ""


def _shown_path(path, folder: Path) -> str:
    """``path`` relative to ``folder`` when it lies inside it, else absolute.

    Links in the file's own path are kept, not resolved: a DataLad dataset's image stays its BIDS
    path rather than becoming the git-annex object it points to (or a missing one).
    """
    path = Path(os.path.abspath(path))
    for base in (Path(os.path.abspath(folder)), Path(folder).resolve()):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


def _first(items: list[str], count: int) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text.split(". ")[0].rstrip(".")
