"""The model store: one folder per model under a root (``/var/lib/lastmile/models``).

The folder name is the model name. The store is the boundary an operator reviews, so a name
can never walk out of it (``..``, ``/``) and neither a folder nor an artifact may be a symlink
that resolves outside it. A broken folder never hides the others: :meth:`ModelStore.entries`
lists it with its error.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lastmile.models.errors import InvalidModelName, ManifestError, ModelNotFoundError, StoreEscapeError
from lastmile.models.formats import infer_signature
from lastmile.models.manifest import load_manifest
from lastmile.models.spec import Manifest

__all__ = [
    "ModelStore",
    "StoreEntry",
    "InvalidModelName",
    "ModelNotFoundError",
    "StoreEscapeError",
    "ManifestError",
    "NAME_RULE",
    "check_name",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = (
    "a name is 1 to 128 characters from A-Z a-z 0-9 _ . -, starts with a letter or digit, and "
    "does not contain '..'"
)


def check_name(name: object) -> str:
    """``name`` if it is a valid model name, else :class:`InvalidModelName`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidModelName(name, NAME_RULE)
    return name


@dataclass(frozen=True)
class StoreEntry:
    """One folder of the store: its manifest, or why it has none."""

    name: str
    manifest: Manifest | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ModelStore:
    """The folders under ``root``. Cheap to build; nothing is read until asked.

    Manifests are cached per folder and re-read when anything at the folder's top level (or
    ``model.toml``) changes, since inferring a ``.pt2`` signature imports torch and loads the
    program: seconds, not something to redo on every ``/v2/repository/index``. The daemon
    passes a ``read_signature`` that does that work in a forkserver child, off the event loop
    (:class:`lastmile.models.signatures.SignatureReader`).
    """

    def __init__(self, root: Path | str, *, read_signature: Callable[[str, Path], Any] | None = None) -> None:
        self.root = Path(root).absolute()
        self.read_signature = read_signature or infer_signature  # the daemon's reads in a forkserver child
        self._cache: dict[str, tuple[tuple, Manifest]] = {}
        self._lock = threading.Lock()

    def ensure(self) -> Path:
        """Create the store folder if missing (mode 0750: the daemon's user and group only)."""
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o750)  # mkdir's mode is cut by the umask; set it exactly
        return self.root

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        # Dot-folders are in-progress builds/installs (see lastmile.models.demo): never models.
        return sorted(p for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir())

    def names(self) -> list[str]:
        """Names of the model folders (valid names only: others cannot be addressed)."""
        out = []
        for path in self._folders():
            try:
                out.append(check_name(path.name))
            except InvalidModelName:
                continue
        return out

    def entries(self) -> list[StoreEntry]:
        """Every model folder, each with its manifest or its error."""
        out: list[StoreEntry] = []
        for path in self._folders():
            try:
                out.append(StoreEntry(path.name, self.get(path.name)))
            except (InvalidModelName, ManifestError, ModelNotFoundError, OSError) as exc:
                out.append(StoreEntry(path.name, None, str(exc)))
        return out

    def path_for(self, name: str) -> Path:
        """``root/name`` after checking the name, and, when it exists, that it resolves inside
        the store. Usable for a model that does not exist yet (installing one)."""
        check_name(name)
        path = self.root / name
        if path.is_symlink() or path.exists():
            real_root = self.root.resolve()
            real = path.resolve()
            if real.parent != real_root:
                raise StoreEscapeError(
                    path, "",
                    f"model folder {name!r} resolves to {real}, outside the model store "
                    f"{real_root}; copy the model into the store instead of linking to it",
                )
        return path

    def get(self, name: str) -> Manifest:
        """The manifest of model ``name``: :class:`InvalidModelName`,
        :class:`ModelNotFoundError`, :class:`StoreEscapeError` or :class:`ManifestError`."""
        path = self.path_for(name)
        if not path.is_dir():
            raise ModelNotFoundError(name, self.root)
        key = self._fingerprint(path)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        manifest = load_manifest(path, name, read_signature=self.read_signature)
        with self._lock:
            self._cache[name] = (key, manifest)
        return manifest

    def __contains__(self, name: object) -> bool:
        try:
            return self.path_for(name).is_dir()  # type: ignore[arg-type]
        except (InvalidModelName, StoreEscapeError):
            return False

    @staticmethod
    def _fingerprint(path: Path) -> tuple:
        """What changes when a model folder is edited: the top-level entries' names, sizes,
        mtimes and symlink targets (``os.stat`` follows links, so a retargeted link shows)."""
        items = []
        for child in sorted(path.iterdir()):
            try:
                st = child.stat()
            except OSError:
                items.append((child.name, None))
                continue
            items.append((child.name, st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(items)
