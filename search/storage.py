"""Where an experiment lives: `--storage` as a local (or shared) folder, or as a folder on object storage.

A path or a file:// URI is a folder, used as it is. s3://BUCKET/PATH and gs://BUCKET/PATH (any URI that
pyarrow resolves, with its query options, e.g. ?endpoint_override=HOST:PORT&scheme=http for an
S3-compatible server) are object storage: Ray Tune keeps trials, checkpoints and its state there itself;
distil-search's own files (distil_search.json, optuna.db, summary.json, confirm.json, the TensorBoard
HParams config) are written to a local folder and uploaded (`push`), and the commands that read an
experiment first mirror it into that folder (`pull`): `<cache>/distil-search/experiments/<where>/<name>`,
with <cache> $XDG_CACHE_HOME or ~/.cache.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import pyarrow
import pyarrow.fs as pafs

from distil_core.errors import UserInputError

from .artifacts import ARTIFACTS, ArtifactStore

META = "distil_search.json"
EXPECTED = ("expected a folder (a path every node mounts, or a file:///path URI) or object storage: "
            "s3://BUCKET/PATH or gs://BUCKET/PATH")


def default_storage() -> str:
    return os.environ.get("DISTIL_SEARCH_STORAGE") or str(Path.home() / "distil-search" / "experiments")


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distil-search"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _redacted(uri: str) -> str:
    """The URI without user:secret@ (it is written into files and messages)."""
    u = urlsplit(uri)
    return urlunsplit(u._replace(netloc=u.hostname or "")) if u.username or u.password else uri


@dataclass(frozen=True)
class Storage:
    """--storage resolved: `local` (a folder), or `fs` + `path` (BUCKET/PREFIX) on object storage."""

    spec: str  # as given, credentials removed: what messages show and `--storage` takes again
    local: Path | None = None
    fs: pafs.FileSystem | None = None
    path: str = ""

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def __str__(self) -> str:
        return self.spec if self.remote else str(self.local)

    def experiment(self, name: str) -> Experiment:
        if self.remote:
            u = urlsplit(self.spec)
            endpoint = parse_qs(u.query).get("endpoint_override", [""])[0].replace(":", "_").replace("/", "_")
            where = f"{u.scheme}-{endpoint}" if endpoint else u.scheme
            return Experiment(name, self, cache_home() / "experiments" / where / self.path / name)
        return Experiment(name, self, self.local / name)


def parse_storage(spec: str | None, check: bool = True) -> Storage:
    """--storage (default $DISTIL_SEARCH_STORAGE or ~/distil-search/experiments) as a Storage; for object
    storage, check (one request) that the bucket exists and these credentials reach it."""
    spec = spec or default_storage()
    if "://" not in spec:
        return Storage(spec, local=Path(spec).expanduser().resolve())
    u = urlsplit(spec)
    if u.scheme == "file":
        if u.netloc not in ("", "localhost"):
            raise UserInputError(f"--storage {spec}: a file:// URI names a folder on this machine "
                                 f"(file:///path); {EXPECTED}")
        return Storage(spec, local=Path(unquote(u.path)).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(spec)
    except OSError as e:  # S3's lookup of the bucket's region; a scheme without its driver (hdfs)
        hint = "" if u.scheme in ("s3", "gs", "gcs") else f"; {EXPECTED}"
        raise UserInputError(f"--storage {spec}: {_first_line(e)}{hint}") from None
    except (pyarrow.ArrowException, ValueError) as e:  # an unknown scheme, bad options
        raise UserInputError(f"--storage {spec}: {_first_line(e)}; {EXPECTED}") from None
    path = path.strip("/")
    bucket = path.split("/")[0]
    if isinstance(fs, pafs.LocalFileSystem) or not bucket:
        raise UserInputError(f"--storage {spec}: no bucket; {EXPECTED}")
    storage = Storage(_redacted(spec), fs=fs, path=path)
    if check:
        try:
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as e:  # credentials, network, permissions
            raise UserInputError(f"--storage {spec}: cannot reach bucket '{bucket}': {_first_line(e)}") from None
        if not found:
            raise UserInputError(f"--storage {spec}: bucket '{bucket}' does not exist (or these credentials "
                                 f"cannot see it); create it first")
    return storage


def is_event_file(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1].startswith("events.out.tfevents")


def not_event_file(rel: str) -> bool:
    return not is_event_file(rel)


@dataclass(frozen=True)
class Experiment:
    """One experiment folder. `local` is what file I/O reads and writes: the folder itself, or, on object
    storage, a local staging and mirror folder kept in step with push() and pull()."""

    name: str
    storage: Storage
    local: Path

    @property
    def remote(self) -> bool:
        return self.storage.remote

    @property
    def fs(self) -> pafs.FileSystem | None:
        return self.storage.fs

    @property
    def tune_path(self) -> str:
        """The experiment for Ray Tune (Tuner.restore, can_restore; with storage_filesystem=fs)."""
        return f"{self.storage.path}/{self.name}" if self.remote else str(self.local)

    @property
    def uri(self) -> str:
        """Where the experiment is, for people: its folder, or scheme://BUCKET/PATH/NAME."""
        return f"{urlsplit(self.storage.spec).scheme}://{self.tune_path}" if self.remote else str(self.local)

    def where(self, path: Path) -> str:
        """A file of the local folder, named where the experiment keeps it."""
        return f"{self.uri}/{Path(path).relative_to(self.local).as_posix()}" if self.remote else str(path)

    def exists(self) -> bool:
        if not self.remote:
            return (self.local / META).is_file()
        try:
            return self.fs.get_file_info(f"{self.tune_path}/{META}").type == pafs.FileType.File
        except OSError as e:
            raise UserInputError(f"--storage {self.storage}: {_first_line(e)}") from None

    def artifact_store(self) -> ArtifactStore | None:
        """Where the prepared artifacts of an experiment on object storage are (None for a folder)."""
        return ArtifactStore(self.fs, f"{self.tune_path}/{ARTIFACTS}") if self.remote else None

    def start(self) -> None:
        """An empty local folder for a new experiment (a stale mirror of the same name is dropped)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)

    def push(self, *names: str) -> None:
        """Upload files (or folders) of the local folder to the experiment on object storage."""
        if not self.remote:
            return
        for name in names:
            pafs.copy_files(str(self.local / name), f"{self.tune_path}/{name}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def pull(self, include: Callable[[str], bool] = not_event_file) -> None:
        """Mirror the experiment into the local folder: new or changed files that `include` takes, never
        checkpoints (export fetches the one it needs) or the prepared artifacts."""
        if not self.remote:
            return
        selector = pafs.FileSelector(self.tune_path, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            rel = info.path[len(self.tune_path) + 1:]
            parts = rel.split("/")
            if (info.type != pafs.FileType.File or parts[0] == ARTIFACTS
                    or any(p.startswith("checkpoint_") for p in parts[:-1]) or not include(rel)):
                continue
            self._download(info, self.local / rel)

    def pull_checkpoint(self, trial_dir: Path) -> None:
        """Download the last checkpoint of one trial (a folder of the local mirror) from object storage."""
        if not self.remote:
            return
        remote = f"{self.tune_path}/{Path(trial_dir).relative_to(self.local).as_posix()}"
        found = [i for i in self.fs.get_file_info(pafs.FileSelector(remote, allow_not_found=True))
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        if not found:
            return
        last = max(found, key=lambda i: i.base_name)
        dest = Path(trial_dir) / last.base_name
        if dest.is_dir():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{last.base_name}-", dir=trial_dir))
        try:
            (tmp / "c").mkdir()  # copy_files makes only the subfolders of a folder
            pafs.copy_files(last.path, str(tmp / "c"), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            (tmp / "c").rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, info: pafs.FileInfo, dest: Path) -> None:
        have = dest.stat() if dest.is_file() else None
        if have and _up_to_date(have, info):
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_file(info.path) as src:
            if have and is_event_file(dest.name) and have.st_size < info.size:
                # event files only grow: append the new records, so a TensorBoard reading this file follows it
                src.seek(have.st_size)
                with open(dest, "ab") as out:
                    out.write(src.read())
            else:  # whole, then renamed: a reader never sees half a file
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
                tmp.write_bytes(src.read())
                tmp.replace(dest)
        if info.mtime_ns is not None:
            os.utime(dest, ns=(info.mtime_ns, info.mtime_ns))


def _up_to_date(have: os.stat_result, info: pafs.FileInfo) -> bool:
    """A mirrored file carries its source's mtime; one written here since (this driver's own files, not
    uploaded yet) is newer: kept."""
    if info.mtime_ns is None:
        return have.st_size == info.size
    return have.st_mtime_ns > info.mtime_ns or (have.st_mtime_ns == info.mtime_ns and have.st_size == info.size)


def find_experiment(ref: str, storage: str | None = None) -> Experiment:
    """An experiment by name under --storage, by folder, or by URI (s3://BUCKET/PATH/NAME?options)."""
    if "://" in ref:
        u = urlsplit(ref)
        parent, _, name = u.path.rstrip("/").rpartition("/")
        exp = parse_storage(urlunsplit(u._replace(path=parent))).experiment(name)
        if name and exp.exists():
            return exp
        raise UserInputError(f"experiment {ref}: no {META} there")
    folder = Path(ref).expanduser()
    if (folder / META).is_file():
        folder = folder.resolve()
        return Experiment(folder.name, Storage(str(folder.parent), local=folder.parent), folder)
    parsed = parse_storage(storage)
    exp = parsed.experiment(ref)
    if exp.exists():
        return exp
    raise UserInputError(f"experiment '{ref}': no {META} found at {ref} or under {parsed}")
