"""The model store: names, escapes, broken folders listed with their error."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from lastmile.models.errors import InvalidModelName, ManifestError, ModelNotFoundError, StoreEscapeError
from lastmile.models.store import NAME_RULE, ModelStore
from tests.models.conftest import tensor_tables

TOML = """\
format = "torchscript"
artifact = "model.pt"

""" + tensor_tables({"x": "[-1, 4]"}, {"y": "[-1, 4]"})


def add_model(root: Path, name: str, text: str = TOML) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"x")
    (folder / "model.toml").write_text(text)
    return folder


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "store")
    s.ensure()
    return s


def test_ensure_creates_0750(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "a" / "models")
    assert s.names() == [] and s.entries() == []
    old = os.umask(0o022)
    try:
        root = s.ensure()
    finally:
        os.umask(old)
    assert root.is_dir() and stat.S_IMODE(root.stat().st_mode) == 0o750


def test_broken_entry_listed_with_error_and_others_kept(store: ModelStore) -> None:
    add_model(store.root, "good")
    add_model(store.root, "broken", TOML.replace('"FP32"', '"FLOAT"', 1))
    (store.root / ".build-x-123").mkdir()  # an in-progress build: never listed
    (store.root / "notes.txt").write_text("not a model")
    assert store.names() == ["broken", "good"]
    entries = {e.name: e for e in store.entries()}
    assert set(entries) == {"broken", "good"}
    assert entries["good"].ok and entries["good"].manifest.inputs[0].name == "x"
    assert entries["broken"].manifest is None
    assert "inputs[0].datatype: got 'FLOAT'" in entries["broken"].error
    with pytest.raises(ManifestError):
        store.get("broken")


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/etc", "", ".hidden", "a..b", "-x", "a b", "x" * 129, "é", None])
def test_invalid_names_refused(store: ModelStore, name: object) -> None:
    with pytest.raises(InvalidModelName) as info:
        store.get(name)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and NAME_RULE in str(info.value)
    with pytest.raises(InvalidModelName):
        store.path_for(name)  # type: ignore[arg-type]


def test_longest_valid_name(store: ModelStore) -> None:
    name = "a" + "b" * 127
    assert store.path_for(name) == store.root / name


def test_not_found(store: ModelStore) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        store.get("nope")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == f"model 'nope' not found in the model store {store.root}"
    assert "nope" not in store


def test_symlinked_folder_out_of_store_refused(store: ModelStore, tmp_path: Path) -> None:
    outside = add_model(tmp_path / "elsewhere", "m")
    (store.root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreEscapeError, match="outside the model store"):
        store.get("linked")
    entry = next(e for e in store.entries() if e.name == "linked")
    assert entry.manifest is None and "outside the model store" in entry.error


def test_symlinked_folder_inside_store_allowed(store: ModelStore) -> None:
    add_model(store.root, "real")
    (store.root / "alias").symlink_to(store.root / "real", target_is_directory=True)
    assert store.get("alias").name == "alias"


def test_symlinked_artifact_out_of_folder_refused(store: ModelStore, tmp_path: Path) -> None:
    folder = add_model(store.root, "m", TOML.replace('"model.pt"', '"link.pt"'))
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"x")
    (folder / "link.pt").symlink_to(secret)
    with pytest.raises(StoreEscapeError, match="outside"):
        store.get("m")


def test_edits_are_seen(store: ModelStore) -> None:
    folder = add_model(store.root, "m")
    assert store.get("m").inputs[0].shape == (-1, 4)
    (folder / "model.toml").write_text(TOML.replace("shape = [-1, 4]", "shape = [-1, 8]", 1) + "\n")
    assert store.get("m").inputs[0].shape == (-1, 8)
    shutil.rmtree(folder)
    with pytest.raises(ModelNotFoundError):
        store.get("m")
