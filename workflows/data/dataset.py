"""Reading an ola-synth/1 dataset for training and evaluation: ``load_split`` and ``verify``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from workflows.data.errors import DataFormatError
from workflows.data.manifest import (
    MANIFEST,
    MEDIA_KEYS,
    SPLIT_FILES,
    read_manifest,
    sha256_file,
    validate_sample,
)

logger = logging.getLogger(__name__)


def _manifest(root: Path) -> dict:
    manifest = read_manifest(root)
    if manifest is None:
        raise DataFormatError(f"{root}: no {MANIFEST}; the dataset is missing or incomplete (generate it again)")
    return manifest


def _check_hash(root: Path, rel: str, expected: str | None, where: str) -> None:
    path = root / rel
    if expected is None:
        raise DataFormatError(f"{where}: {rel} is not listed in {MANIFEST}")
    if not path.is_file():
        raise DataFormatError(f"{where}: {rel} is missing")
    got = sha256_file(path)
    if got != expected:
        raise DataFormatError(f"{where}: {rel} has sha256 {got[:12]}..., the manifest says {expected[:12]}...")


def load_split(root: str | Path, split: str, check_hashes: bool = False) -> list[dict]:
    """The samples of one split, validated, with media paths made absolute.

    The split JSON's hash is always checked against the manifest; media files are checked to exist, and with
    ``check_hashes`` their hashes too.

    Args:
        root: the dataset directory.
        split: "train", "val" or "test".
        check_hashes: also recompute the sha256 of every media file of the split.

    Returns:
        The records as in the split JSON, except that ``image`` / ``video`` / ``audio`` / ``audio_q`` are absolute
        paths (str).

    Raises:
        DataFormatError: no or invalid manifest, unknown split, a sample off the format, a missing or changed file.
    """
    root = Path(root).resolve()
    if split not in SPLIT_FILES:
        raise DataFormatError(f"unknown split {split!r}; expected one of {list(SPLIT_FILES)}")
    manifest = _manifest(root)
    name = SPLIT_FILES[split]
    _check_hash(root, name, manifest["files"].get(name), str(root))
    samples = json.loads((root / name).read_text())
    if not isinstance(samples, list):
        raise DataFormatError(f"{root / name}: expected a JSON list of samples")
    expected = sum(manifest["counts"][split].values())
    if len(samples) != expected:
        raise DataFormatError(f"{root / name}: {len(samples)} samples, the manifest counts {expected}")
    out = []
    seen: set[str] = set()
    for i, sample in enumerate(samples):
        where = f"{name}[{i}]"
        validate_sample(sample, where)
        if sample["id"] in seen:
            raise DataFormatError(f"{where}: duplicate id {sample['id']!r}")
        seen.add(sample["id"])
        record = dict(sample)
        for key in MEDIA_KEYS:
            if key not in sample:
                continue
            rel = sample[key]
            if check_hashes:
                _check_hash(root, rel, manifest["files"].get(rel), where)
            elif not (root / rel).is_file():
                raise DataFormatError(f"{where}: {key} file {rel} is missing")
            record[key] = str(root / rel)
        out.append(record)
    return out


@dataclass
class VerifyReport:
    """The result of :func:`verify`: files that are missing, changed, or present but not listed."""

    root: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.unlisted)

    def summary(self) -> str:
        if self.ok:
            return f"{self.root}: {self.checked} files verified"
        parts = [
            f"{self.root}: {len(self.missing)} missing, {len(self.mismatched)} changed, {len(self.unlisted)} unlisted"
        ]
        parts += [f"  missing: {p}" for p in self.missing[:20]]
        parts += [f"  changed: {p}" for p in self.mismatched[:20]]
        parts += [f"  unlisted: {p}" for p in self.unlisted[:20]]
        return "\n".join(parts)


def verify(root: str | Path) -> VerifyReport:
    """Recompute the sha256 of every file the manifest lists, and look for media files it does not list.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is True when everything matches.

    Raises:
        DataFormatError: when there is no valid manifest.
    """
    root = Path(root).resolve()
    manifest = _manifest(root)
    report = VerifyReport(root)
    for rel, expected in manifest["files"].items():
        path = root / rel
        report.checked += 1
        if not path.is_file():
            report.missing.append(rel)
        elif sha256_file(path) != expected:
            report.mismatched.append(rel)
    media = root / "media"
    if media.is_dir():
        listed = set(manifest["files"])
        report.unlisted = sorted(
            rel for p in media.rglob("*") if p.is_file() and (rel := p.relative_to(root).as_posix()) not in listed
        )
    if not report.ok:
        logger.warning("%s", report.summary())
    return report
