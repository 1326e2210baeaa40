"""A search's prepared artifacts on object storage, for trials on nodes that do not share the driver's disk.

The driver prepares once: tokenized datasets (Arrow files), the fine-tuned teacher (a folder) and the
teacher's outputs (a folder), each named by a content hash (`Prepared.artifacts()` lists their paths).
With the experiment on object storage, `upload` copies them to <experiment>/artifacts/ after preparation.
In a trial, `localize` keeps every path the node has (local Ray, a shared file system: read in place) and
downloads the others once per node into a node-local cache, under the same content-hash names.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

ARTIFACTS = "artifacts"  # the folder in the experiment


@dataclass(frozen=True)
class ArtifactStore:
    """The artifacts folder of an experiment on object storage."""

    fs: pafs.FileSystem
    root: str  # BUCKET/PATH/NAME/artifacts


def node_cache() -> Path:
    """Where a node keeps downloaded artifacts: $XDG_CACHE_HOME (or ~/.cache)/distil-search/artifacts."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distil-search" / ARTIFACTS


def remote_names(artifacts: dict[str, Any]) -> dict[str, Any]:
    """Each artifact's name under the store, built from the content hash its cache name carries."""
    names = {"train": f"tokenized/{Path(artifacts['train']).name}",
             "dev": {split: f"tokenized/{Path(path).name}" for split, path in artifacts["dev"].items()},
             "outputs": f"teacher_outputs/{Path(artifacts['outputs']).name}"}
    if Path(artifacts["teacher"]).is_dir():  # a hub id is not uploaded: every node can load it from the hub
        names["teacher"] = "teachers/" + artifacts["teacher_identity"].replace(":", "-")
    return names


def _pairs(artifacts: dict[str, Any], names: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield artifacts["train"], names["train"]
    for split, path in artifacts["dev"].items():
        yield path, names["dev"][split]
    yield artifacts["outputs"], names["outputs"]
    if "teacher" in names:
        yield artifacts["teacher"], names["teacher"]


def upload(artifacts: dict[str, Any], store: ArtifactStore) -> dict[str, Any]:
    """Copy the artifacts to the store; returns `artifacts` plus their names there (key "remote")."""
    names = remote_names(artifacts)
    for path, name in _pairs(artifacts, names):
        pafs.copy_files(path, f"{store.root}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=store.fs)
    return {**artifacts, "remote": names}


def localize(artifacts: dict[str, Any], store: ArtifactStore | None, cache: Path | None = None,
             training: bool = True) -> dict[str, Any]:
    """`artifacts` with every path this node lacks replaced by its node-cache copy (downloaded once).
    training=False: the teacher's outputs on the train set (the largest artifact) are not fetched; their
    path becomes None where this node lacks them."""
    names = artifacts.get("remote")
    if not names or store is None:
        return artifacts
    cache = Path(cache) if cache else node_cache()

    def here(path: str, name: str | None) -> str:
        return path if name is None or Path(path).exists() else str(fetch(store, name, cache))

    out = copy.deepcopy(artifacts)
    out["train"] = here(out["train"], names["train"])
    out["dev"] = {split: here(path, names["dev"].get(split)) for split, path in out["dev"].items()}
    if training or Path(out["outputs"]).exists():
        out["outputs"] = here(out["outputs"], names["outputs"])
    else:
        out["outputs"] = None
    out["teacher"] = here(out["teacher"], names.get("teacher"))
    return out


def fetch(store: ArtifactStore, name: str, cache: Path) -> Path:
    """cache/name, downloaded from the store unless there: into a temporary folder, then renamed, so trials
    that start together on one node never read a half-written copy (the first rename wins)."""
    dest = cache / name
    if dest.exists():
        return dest
    src = f"{store.root}/{name}"
    kind = store.fs.get_file_info(src).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"prepared artifact {src} is missing from the experiment's storage")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        if kind == pafs.FileType.Directory:  # copy_files makes only the subfolders of a folder
            (tmp / dest.name).mkdir()
        pafs.copy_files(src, str(tmp / dest.name), source_filesystem=store.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp / dest.name, dest)
        except OSError:  # a folder that another trial renamed into place first
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepared_for(cfg, artifacts: dict[str, Any] | None, store: ArtifactStore | None, training: bool = True):
    """What a run of cfg trains on: the search's prepared artifacts (localized) when cfg's data and teacher
    settings are the ones they were prepared for, else a fresh preparation (cache hits where they match).
    training=False (evaluation only): see `localize`."""
    from distil_core.recipe import load_prepared, prepare, preparation_key

    if artifacts is not None and artifacts["key"] == preparation_key(cfg):
        return load_prepared(cfg, localize(artifacts, store, training=training))
    return prepare(cfg, progress=False)
