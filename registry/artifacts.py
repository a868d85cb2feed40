"""Content-addressed artifact store: ``<artifact_dir>/sha256/<ab>/<hex>.<ext>``.

The registry records the path relative to the store, so every host that mounts
the same store at its own ``artifact_dir`` resolves the same bytes. A recorded
location must stay inside the store: absolute paths, ``..`` components and
symlinks that lead out are refused, both when registering and when reading
(a registry hash may be hostile). Integrity errors name the model version and
variant they were asked for, never a file's path or hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePath

from protocol.errors import ArtifactIntegrityError, RegistryError

CHUNK_BYTES = 1 << 20


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def inside(artifact_dir: Path, relative: str) -> Path | None:
    """``relative`` resolved (symlinks followed) if that stays inside the store, else None."""
    pure = PurePath(relative)
    if not relative or pure.is_absolute() or relative.startswith(("/", "\\")) or ".." in pure.parts:
        return None
    try:
        root = artifact_dir.resolve()
        path = (root / pure).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return None
    return path if path.is_relative_to(root) and path != root else None


def store(source: Path, artifact_dir: Path) -> tuple[str, str, int]:
    """Copy ``source`` into the store; returns (relative path, sha256, size in bytes)."""
    if not source.is_file():
        raise RegistryError(f"artifact {source} is not a file")
    sha256 = sha256_of(source)
    relative = Path("sha256") / sha256[:2] / f"{sha256}{source.suffix}"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    target = inside(artifact_dir, str(relative))
    if target is None:
        raise RegistryError(f"the artifact directory's {relative.parent} leads outside it; not storing there")
    # A file already there is reused only if it holds these bytes (the store is content-addressed).
    if not (target.is_file() and sha256_of(target) == sha256):
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy beside the target then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        os.close(fd)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return str(relative), sha256, target.stat().st_size


def verified_path(artifact_dir: Path, relative: str, sha256: str, *, what: str) -> Path:
    """The artifact's real path inside the store after checking its bytes against ``sha256``.

    ``what`` names the artifact in errors (e.g. ``"m v3 torch_export"``). For loading,
    prefer :func:`read_verified`: a path can be rewritten between the check and its use.
    """
    path = _located(artifact_dir, relative, what)
    if sha256_of(path) != sha256:
        raise _mismatch(what)
    return path


def read_verified(artifact_dir: Path, relative: str, sha256: str, *, what: str) -> bytes:
    """The artifact's bytes, read once and checked against ``sha256``: the bytes checked are those used."""
    path = _located(artifact_dir, relative, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactIntegrityError(f"{what}: artifact is missing or unreadable") from e
    if hashlib.sha256(data).hexdigest() != sha256:
        raise _mismatch(what)
    return data


def _located(artifact_dir: Path, relative: str, what: str) -> Path:
    if not relative:
        raise ArtifactIntegrityError(f"{what}: no artifact recorded")
    path = inside(artifact_dir, relative)
    if path is None:
        raise ArtifactIntegrityError(f"{what}: artifact location is outside the artifact directory; "
                                     "refusing to load")
    if not path.is_file():  # also keeps FIFOs and devices from being read
        raise ArtifactIntegrityError(f"{what}: artifact is missing")
    return path


def _mismatch(what: str) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(f"{what}: artifact bytes do not match the registered sha256; "
                                  "refusing to load")
