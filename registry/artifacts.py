"""Content-addressed artifact store: ``<artifact_dir>/sha256/<ab>/<hex>.<ext>``.

The registry records the path relative to the store, so every host that mounts
the same store at its own ``artifact_dir`` resolves the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from protocol.errors import ArtifactIntegrityError, RegistryError

CHUNK_BYTES = 1 << 20


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def store(source: Path, artifact_dir: Path) -> tuple[str, str, int]:
    """Copy ``source`` into the store; returns (relative path, sha256, size in bytes)."""
    if not source.is_file():
        raise RegistryError(f"artifact {source} is not a file")
    sha256 = sha256_of(source)
    relative = Path("sha256") / sha256[:2] / f"{sha256}{source.suffix}"
    target = artifact_dir / relative
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy beside the target then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        os.close(fd)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return str(relative), sha256, target.stat().st_size


def verified_path(artifact_dir: Path, relative: str, sha256: str) -> Path:
    """The artifact's path after checking its bytes against ``sha256``; raises on mismatch."""
    path = artifact_dir / relative
    if not path.is_file():
        raise ArtifactIntegrityError(f"artifact {path} is missing")
    actual = sha256_of(path)
    if actual != sha256:
        raise ArtifactIntegrityError(
            f"artifact {path} has sha256 {actual[:12]}…, registry expects {sha256[:12]}…; refusing to load"
        )
    return path
