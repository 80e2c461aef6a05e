"""The ola-synth/1 format (docs/data-format.md): manifest and sample validation, hashing, atomic JSON writes.

``manifest.json`` is written last, atomically, so a dataset directory without one is incomplete. It lists the sha256
of every media file and split JSON; samples are LLaVA-style records whose human turn holds the placeholders of Ola's
inference layouts (``ola_model.prompt.user_content``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from ola_model.prompt import ASR_PROMPT, IMAGE_PLACEHOLDER, SPEECH_PLACEHOLDER, user_content
from workflows.data.errors import DataFormatError
from workflows.data.world import SPLITS, TASKS

FORMAT = "ola-synth/1"
MANIFEST = "manifest.json"
SPLIT_FILES: dict[str, str] = {split: f"{split}.json" for split in SPLITS}
MEDIA_KEYS: tuple[str, ...] = ("image", "video", "audio", "audio_q")
# The media keys each task carries (exactly these).
TASK_MEDIA: dict[str, frozenset[str]] = {
    "image_qa": frozenset({"image"}),
    "caption": frozenset({"image"}),
    "ocr": frozenset({"image"}),
    "asr": frozenset({"audio"}),
    "spoken_image_qa": frozenset({"image", "audio_q"}),
    "sound_qa": frozenset({"audio"}),
    "video_qa": frozenset({"video"}),
    "video_audio_qa": frozenset({"video"}),
}
# The human turn's head (placeholders, then the question) of each task; spoken_image_qa's is the whole turn.
TASK_HEADS: dict[str, str] = {
    "image_qa": user_content("", num_images=1),
    "caption": user_content("", num_images=1),
    "ocr": user_content("", num_images=1),
    "asr": user_content("", audio=True),
    "spoken_image_qa": user_content("", num_images=1, audio=True, spoken_question=True),
    "sound_qa": user_content("", audio=True),
    "video_qa": user_content("", video=True),
    "video_audio_qa": user_content("", video=True, audio=True),
}
MEDIA_EXTENSIONS = {"image": ".png", "video": ".mp4", "audio": ".wav", "audio_q": ".wav"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dump_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON document: key order as built, 1-space indent, ASCII, trailing newline."""
    return (json.dumps(obj, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_relpath(rel: Any, where: str) -> str:
    """A relative POSIX path inside the dataset (no absolute paths, no '..')."""
    if not isinstance(rel, str) or not rel:
        raise DataFormatError(f"{where}: expected a relative path string, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise DataFormatError(f"{where}: path {rel!r} must be relative to the dataset and stay inside it")
    return rel


MULTI_TURN_TASKS = frozenset({"image_qa"})  # tasks whose samples may ask several questions (synth --qa-turns)


def validate_sample(sample: Any, where: str) -> None:
    """Check one record against the format: keys for its task, the human turn's placeholders, a short answer.

    Raises:
        DataFormatError: naming ``where`` (e.g. "train.json[12]"), the field and what was expected.
    """
    if not isinstance(sample, dict):
        raise DataFormatError(f"{where}: a sample must be an object, got {type(sample).__name__}")
    for key in ("id", "task", "conversations"):
        if key not in sample:
            raise DataFormatError(f"{where}: missing key {key!r}")
    task = sample["task"]
    if task not in TASK_MEDIA:
        raise DataFormatError(f"{where}: unknown task {task!r}; expected one of {list(TASKS)}")
    where = f"{where} ({sample['id']}, {task})"
    media = {k for k in MEDIA_KEYS if k in sample}
    if media != TASK_MEDIA[task]:
        raise DataFormatError(f"{where}: media keys {sorted(media)}, expected {sorted(TASK_MEDIA[task])}")
    for key in media:
        rel = check_relpath(sample[key], f"{where}.{key}")
        if not rel.endswith(MEDIA_EXTENSIONS[key]):
            raise DataFormatError(f"{where}.{key}: {rel!r} should be a {MEDIA_EXTENSIONS[key]} file")
    if (task == "spoken_image_qa") != ("text_q" in sample):
        raise DataFormatError(f"{where}: text_q is required for spoken_image_qa and only there")
    turns = sample["conversations"]
    if (
        not isinstance(turns, list)
        or len(turns) < 2
        or len(turns) % 2
        or [t.get("from") if isinstance(t, dict) else None for t in turns] != ["human", "gpt"] * (len(turns) // 2)
        or not all(isinstance(t.get("value"), str) for t in turns)
    ):
        raise DataFormatError(
            f"{where}.conversations: expected [{{from: human, value}}, {{from: gpt, value}}] (image_qa: more pairs)"
        )
    if len(turns) > 2 and task not in MULTI_TURN_TASKS:
        raise DataFormatError(f"{where}.conversations: {task} has one question and one answer, got {len(turns)} turns")
    for i, turn in enumerate(turns[2:], start=2):
        text = turn["value"]
        if turn["from"] == "human" and (not text.strip() or IMAGE_PLACEHOLDER in text or SPEECH_PLACEHOLDER in text):
            raise DataFormatError(f"{where}.conversations[{i}]: a later question must be plain text, got {text!r}")
        if turn["from"] == "gpt" and (not text.strip() or text != text.lower()):
            raise DataFormatError(f"{where}.conversations[{i}]: an answer must be non-empty lowercase, got {text!r}")
    human, answer = turns[0]["value"], turns[1]["value"]
    head = TASK_HEADS[task]
    if task == "spoken_image_qa":
        if human != head or not isinstance(sample["text_q"], str) or not sample["text_q"].strip():
            raise DataFormatError(f"{where}: the human turn must be exactly {head!r}, with the question in text_q")
    else:
        question = human[len(head) :]
        if not human.startswith(head) or not question.strip():
            raise DataFormatError(f"{where}: the human turn must be {head!r} followed by the question, got {human!r}")
        if IMAGE_PLACEHOLDER in question or SPEECH_PLACEHOLDER in question:
            raise DataFormatError(f"{where}: placeholders after the layout's head in {human!r}")
        if task == "asr" and question != ASR_PROMPT:
            raise DataFormatError(f"{where}: the asr question must be exactly {ASR_PROMPT!r}, got {question!r}")
    if not answer.strip() or answer != answer.lower():
        raise DataFormatError(f"{where}: the answer must be a non-empty lowercase string, got {answer!r}")


def validate_manifest(manifest: Any, where: str = MANIFEST) -> dict:
    """Check a manifest's structure (not the files it lists).

    Returns:
        The manifest, unchanged.

    Raises:
        DataFormatError: naming the field and what was expected.
    """
    if not isinstance(manifest, dict):
        raise DataFormatError(f"{where}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise DataFormatError(f"{where}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("seed", int), ("size", int), ("splits", dict), ("counts", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise DataFormatError(f"{where}: {key!r} must be a JSON {kind.__name__}")
    if manifest["splits"] != SPLIT_FILES:
        raise DataFormatError(f"{where}: splits is {manifest['splits']}, expected {SPLIT_FILES}")
    gen = manifest.get("generator")
    if not isinstance(gen, dict) or not isinstance(gen.get("version"), str) or not isinstance(gen.get("params"), dict):
        raise DataFormatError(f"{where}: generator must be {{version: str, params: object}}")
    if set(manifest["counts"]) != set(SPLITS):
        raise DataFormatError(f"{where}: counts must have exactly the splits {list(SPLITS)}")
    total = 0
    for split, counts in manifest["counts"].items():
        if not isinstance(counts, dict):
            raise DataFormatError(f"{where}: counts[{split!r}] must be an object of task counts")
        for task, n in counts.items():
            if task not in TASK_MEDIA or not isinstance(n, int) or n < 0:
                raise DataFormatError(f"{where}: counts[{split!r}][{task!r}] = {n!r} is not a task's count")
            total += n
    if total != manifest["size"]:
        raise DataFormatError(f"{where}: counts add up to {total}, but size is {manifest['size']}")
    for rel, digest in manifest["files"].items():
        check_relpath(rel, f"{where}: files")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise DataFormatError(f"{where}: files[{rel!r}] is not a sha256 hex digest")
    for name in SPLIT_FILES.values():
        if name not in manifest["files"]:
            raise DataFormatError(f"{where}: files has no hash for {name}")
    return manifest


def read_manifest(root: Path) -> dict | None:
    """The validated manifest of ``root``, or None when there is none (the directory is incomplete).

    Raises:
        DataFormatError: when the manifest exists but is not valid JSON or not an ola-synth/1 manifest.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON: {exc}") from exc
    return validate_manifest(manifest, str(path))


def make_manifest(
    seed: int,
    size: int,
    counts: Mapping[str, Mapping[str, int]],
    files: Mapping[str, str],
    version: str,
    params: Mapping[str, Any],
) -> dict:
    """A manifest with the format's key order; ``files`` sorted by path."""
    return {
        "format": FORMAT,
        "seed": seed,
        "size": size,
        "splits": dict(SPLIT_FILES),
        "counts": {split: dict(counts[split]) for split in SPLITS},
        "files": dict(sorted(files.items())),
        "generator": {"version": version, "params": dict(params)},
    }
