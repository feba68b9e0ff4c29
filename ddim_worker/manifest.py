"""The Parquet manifest's rules: where its files are, how its columns map onto ours, a row's settings and its id.

Reading the rows themselves is streamed by Ray tasks (``ddim_worker.job.source``); this module holds the rules they
apply to each row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from ddim_worker.rows import RowError, is_missing
from ddim_worker.core.settings import DEFAULTS, SETTING_NAMES, EditSettings, SettingError, from_values

log = logging.getLogger(__name__)

#: Our column names: ``image_url`` or ``image`` is required, and both prompts; every edit setting may be a column.
OUR_COLUMNS = ("id", "image_url", "image", "source_prompt", "edit_prompt", *SETTING_NAMES)

#: Ids become object keys (``images/<id>.png``): letters, digits, ``._-`` only, not starting with a dot, bounded.
SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

#: Prompts longer than this (characters) are refused: CLIP reads 77 tokens, so most of such a prompt is ignored.
DEFAULT_MAX_PROMPT_CHARS = 1000


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing file or column, bad mapping): one clear message."""


@dataclass(frozen=True)
class ManifestFiles:
    files: tuple[str, ...]  # full URIs (protocol included for remote files)
    base_uri: str  # the manifest's own folder: relative image paths resolve against it
    is_local: bool


def parse_column_map(text: str | None) -> dict[str, str]:
    """``"image_url=URL,source_prompt=TEXT"`` -> ``{"image_url": "URL", ...}``; unknown names of ours are an error."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ours, sep, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or not ours or not theirs:
            raise ManifestError(f"--columns entry {part!r} is not of the form ours=theirs")
        if ours not in OUR_COLUMNS:
            raise ManifestError(f"--columns: {ours!r} is not one of our columns: {', '.join(OUR_COLUMNS)}")
        mapping[ours] = theirs
    return mapping


#: Names that are never data in a manifest folder, at any depth: Spark/Hadoop leave ``_SUCCESS``, ``_temporary/``
#: (half-written attempts), ``.part-0.parquet.crc``; pyarrow and Spark skip the same prefixes (``ignore_prefixes``).
IGNORED_PREFIXES = (".", "_")


def _ignored(relative: str) -> bool:
    """Whether a path under the manifest folder has a part (folder or file name) starting with an ignored prefix."""
    return any(part.startswith(IGNORED_PREFIXES) for part in relative.split("/") if part)


def _listed_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The Parquet files under a manifest folder: hidden and ``_`` names skipped, and non-regular files (a FIFO, a
    device, a socket: reading one would hang a task or never end) skipped with a warning."""
    root = path.rstrip("/") + "/"
    found = {name: info for name, info in fs.find(path, detail=True).items()
             if name.endswith((".parquet", ".pq"))
             and not _ignored(name[len(root):] if name.startswith(root) else posixpath.basename(name))}
    return _regular(found)


def _regular(found: dict[str, dict]) -> list[str]:
    """The regular files of a listing, sorted; anything else is skipped with a warning (never opened)."""
    files = []
    for name, info in sorted(found.items()):
        if info.get("type") == "file":
            files.append(name)
        elif info.get("type") != "directory":
            log.warning("manifest: skipping %s: not a regular file (%s)", name, info.get("type"))
    return files


def find_manifest_files(uri: str, storage_options: dict | None = None) -> ManifestFiles:
    """A Parquet file, a folder of them or a glob, local or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    is_local = protocol in ("file", "local")

    def full(p: str) -> str:
        return p if is_local else f"{protocol}://{p}"

    if any(ch in path for ch in "*?["):
        files = _regular(fs.glob(path, detail=True))
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        files = _listed_files(fs, path)
        base = path
    elif fs.exists(path):
        files, base = [path], posixpath.dirname(path)
    else:
        raise ManifestError(f"manifest {uri!r} does not exist")
    if not files:
        raise ManifestError(f"manifest {uri!r} has no Parquet files")
    return ManifestFiles(tuple(full(f) for f in files), full(base), is_local)


def resolve_columns(names: list[str], mapping: Mapping[str, str]) -> dict[str, str]:
    """ours -> the manifest's column, for every column of ours present; errors list the manifest's columns."""
    available = ", ".join(names)
    for ours, theirs in mapping.items():
        if theirs not in names:
            raise ManifestError(f"--columns maps {ours!r} to {theirs!r}, which the manifest lacks; "
                                f"its columns are: {available}")
    resolved = {c: c for c in OUR_COLUMNS if c in names and c not in mapping.values()}
    resolved.update(mapping)
    if "image_url" not in resolved and "image" not in resolved:
        raise ManifestError(f"the manifest has no image column (image_url or image; map yours with --columns "
                            f"image_url=... or image=...); its columns are: {available}")
    for needed in ("source_prompt", "edit_prompt"):
        if needed not in resolved:
            raise ManifestError(f"the manifest has no {needed} column (map yours with --columns {needed}=...); "
                                f"its columns are: {available}")
    return resolved


def embedded_bytes(value: Any) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an embedded image: the Hugging Face ``Image`` struct or plain binary."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, Mapping):
        data = value.get("bytes")
        return (bytes(data) if data is not None else None), value.get("path")
    raise RowError("not_an_image", f"the image column holds {type(value).__name__}, not bytes or an Image struct")


# -- per-row settings --------------------------------------------------------------------------------------------

def row_settings(record: Mapping[str, Any], defaults: EditSettings,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> dict[str, Any]:
    """The settings and prompts one row runs with (its own where given, the job's where null), validated by the
    one validator of :mod:`ddim_worker.core.settings`; raises RowError (``bad_setting``, ``bad_prompt``)."""
    try:
        settings = from_values(record, defaults).as_dict()
    except SettingError as exc:
        if exc.name == "negative_prompt":
            raise RowError("bad_prompt", str(exc)) from None
        raise RowError("bad_setting", str(exc)) from None
    for name in ("source_prompt", "edit_prompt", "negative_prompt"):
        value = settings[name] if name == "negative_prompt" else record.get(name)
        if is_missing(value):
            raise RowError("bad_prompt", f"{name} is missing (null)")
        if not isinstance(value, str):
            raise RowError("bad_prompt", f"{name} must be text, got {type(value).__name__}")
        if name != "negative_prompt" and not value.strip():
            raise RowError("bad_prompt", f"{name} is empty")
        if len(value) > max_prompt_chars:
            raise RowError("bad_prompt", f"{name} has {len(value)} characters, over the limit of "
                                         f"{max_prompt_chars} (--max-prompt-chars); CLIP reads 77 tokens")
        settings[name] = value
    return settings


#: The settings a content-hash id always covers (the negative prompt is covered as a prompt). Every later setting
#: (``eta``, attention control, masks, and any declared after them) joins only when a row gives it, so ids from
#: before it was a column stay the same (a rerun resumes instead of redoing every row).
_ID_SETTINGS = ("num_steps", "start_step", "guidance_scale", "inversion_guidance", "seed", "inversion")
ID_SETTINGS_WHEN_GIVEN = tuple(n for n in SETTING_NAMES if n not in _ID_SETTINGS and n != "negative_prompt")


def image_reference(record: dict[str, Any]) -> None:
    """Settle which image a row names, in place: ``image_url`` (text, or None when null or empty) or, failing that,
    the embedded image's bytes (``image_bytes``, with ``image_digest``) or its path; the ``image`` value is dropped.

    Raises ``RowError("missing_image")`` when the row names no image at all: a null never becomes a file name.
    """
    url = record.get("image_url")
    if is_missing(url) or (isinstance(url, str) and not url.strip()):
        url = None
    elif not isinstance(url, str):
        raise RowError("missing_image", f"image_url must be text, got {type(url).__name__}: {url!r}")
    record["image_url"] = url
    embedded = record.pop("image", None)
    if url is None and embedded is not None:
        data, path = embedded_bytes(embedded)
        if data is not None:
            record["image_bytes"] = data
            record["image_digest"] = hashlib.sha256(data).hexdigest()
        elif path and not is_missing(path):
            record["image_url"] = str(path)
    if record["image_url"] is None and record.get("image_bytes") is None:
        raise RowError("missing_image", "the row names no image: image_url is null or empty and no image is "
                                        "embedded")


def id_hash(row_id_text: str) -> int:
    """A 64-bit hash of an id (never 0, which marks "no id"), for duplicate and done checks in NumPy."""
    value = int.from_bytes(hashlib.blake2b(row_id_text.encode(), digest_size=8).digest(), "little")
    return value or 1


def usable_id(value: Any) -> bool:
    """Whether ``value`` is an id a result can be filed under (text an object key may hold)."""
    return isinstance(value, str) and bool(SAFE_ID.match(value)) and ".." not in value


def ledger_key(row_id_text: Any, error_code: Any, manifest_row: int) -> int:
    """What a result row is filed under in the ledger: its id's hash, or, for a row whose id cannot be used (or
    repeats an earlier row's), its manifest position: such rows are one result each, never merged with the id's."""
    if usable_id(row_id_text) and error_code != "duplicate_id":
        return id_hash(row_id_text)
    return id_hash(f"\x00manifest-row:{int(manifest_row)}")


#: Settings declared after input digests were first recorded: they join a row's digest only when they differ from
#: their default, so the rows an earlier version finished keep their digests (a rerun does not redo them).
DIGEST_WHEN_SET = ("candidates", "sample_cross_replace", "sample_self_replace", "control_rules")


def input_digest(row_id_text: str, values: Mapping[str, Any]) -> str:
    """A digest of what a row is made from: its id, image reference, prompts and every resolved setting.

    The results and the PNG record it; a rerun redoes an ``ok`` row whose digest changed under the same id.
    """
    content = {
        "id": row_id_text,
        "image": values.get("image_url") or values.get("image_digest"),
        "source_prompt": values.get("source_prompt"),
        "edit_prompt": values.get("edit_prompt"),
        "settings": {name: values.get(name) for name in SETTING_NAMES
                     if name not in DIGEST_WHEN_SET or values.get(name) != getattr(DEFAULTS, name)},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_id(record: Mapping[str, Any]) -> str:
    """The row's own id if it has one (checked: ids become object keys), else a stable hash of its content."""
    given = record.get("id")
    if not is_missing(given):
        text = str(given)
        if not usable_id(text):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise RowError("bad_setting", f"id {shown!r} cannot be used as an object key: ids are 1-128 characters "
                                          "of letters, digits, '.', '_' and '-', not starting with '.', without '..'")
        return text
    content = {
        "image": record.get("image_url") or record.get("image_digest"),
        "source_prompt": record.get("source_prompt"),
        "edit_prompt": record.get("edit_prompt"),
        "negative_prompt": record.get("negative_prompt"),
        "settings": {k: record.get(k) for k in _ID_SETTINGS},
    }
    for name in ID_SETTINGS_WHEN_GIVEN:
        if record.get(name) is not None:
            content["settings"][name] = record.get(name)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return f"r-{digest[:20]}"

