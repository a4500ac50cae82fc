"""Reading an ONNX package: the manifest is the only contract with the exporter.

The runtime never imports the export side; it reads `manifest.json`, checks the format version and
(by default) every file's sha256, and hands out graph paths and the pipeline's source configs.

Checksums and big packages: hashing a 20-40 GB package reads it once more than loading it does, so a
file whose full check passed is recorded in a user cache (never inside the package, which may be
read-only) with its size, mtime, ctime and inode; the next open trusts a file whose stat still
matches and whose manifest sha256 is the one recorded ("cached", the default). "full" hashes every
file again; "off" skips the check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glm_image_onnx.atomic import write_text
from glm_image_onnx.errors import UsageError
from glm_image_onnx.manifest import MANIFEST, Graph, Manifest, ManifestError, Pipeline, sha256_file

log = logging.getLogger(__name__)

VerifyMode = Literal["cached", "full", "off"]
VERIFY_MODES: tuple[VerifyMode, ...] = ("cached", "full", "off")
CACHE_ENV = "GLM_IMAGE_ONNX_CACHE"
# hashlib releases the GIL while it hashes a chunk, so threads hash separate files on separate
# cores (~1.75 GB/s each with SHA-NI); past a few threads the disk, not the CPU, is the limit.
HASH_THREADS = min(8, os.cpu_count() or 1)
_warned: set[str] = set()  # cache folders we already said we cannot write


def verify_mode(verify_files: bool | str) -> VerifyMode:
    """`verify_files` as a mode: True is "cached" (the old default), False is "off"."""
    if isinstance(verify_files, bool):
        return "cached" if verify_files else "off"
    if verify_files in VERIFY_MODES:
        return verify_files  # type: ignore[return-value]
    raise ValueError(f"verify_files must be one of {', '.join(VERIFY_MODES)} (or True / False), "
                     f"not {verify_files!r}")


def cache_dir() -> Path:
    """$GLM_IMAGE_ONNX_CACHE, else $XDG_CACHE_HOME/glm-image-onnx, else ~/.cache/glm-image-onnx."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glm-image-onnx"


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime too: unlike mtime it cannot be set back (touch -r, a copy that keeps mtimes), so a
    # rewritten file misses even when its mtime was restored; the inode catches a replaced file.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _cache_file(root: Path) -> Path:
    # One cache file per package folder (its resolved path), rewritten on each hash: a re-export in
    # place reuses it, and no stale files pile up. Entries carry the manifest's sha256, so a
    # changed manifest cannot be vouched for by an old entry.
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{digest}.json"


class PackageError(UsageError):
    """The package cannot be used; the message names the bad file."""


@dataclass(frozen=True)
class Package:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: Path | str, verify_files: bool | VerifyMode = "cached") -> "Package":
        """Read and check the manifest, then the files per `verify_files` ("cached", "full", "off")."""
        mode = verify_mode(verify_files)  # a bad value fails before any I/O
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise PackageError(f"package folder {root} does not exist")
        try:
            manifest = Manifest.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise PackageError(f"{path} is missing: not an exported glm-image-onnx package") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{path} is malformed ({e})") from None
        except ManifestError as e:
            raise PackageError(f"{path}: {e}") from None
        package = cls(root, manifest)
        if mode != "off":
            package.verify_files(mode)
        return package

    def verify_files(self, mode: VerifyMode = "full") -> None:
        """Check every listed file's size (always: a stat is free) and sha256, except in "cached" mode
        for files the cache vouches for; raises PackageError naming the first bad file."""
        files = self.manifest.files
        stats = {}
        for rel, entry in files.items():
            path = self.root / rel
            if not path.is_file():
                raise PackageError(f"{path} is missing (listed in {MANIFEST})")
            stats[rel] = _stat_key(path.stat())
            if stats[rel][0] != entry.bytes:
                # the old wording ("does not match its sha256") kept: callers and tests match on it
                raise PackageError(f"{path} does not match its sha256 in {MANIFEST} ({stats[rel][0]} bytes, "
                                   f"the manifest lists {entry.bytes}: truncated or modified)")
        cache_file = _cache_file(self.root)
        cached = _read_cache(cache_file) if mode == "cached" else {}
        good = {rel: stats[rel] + [entry.sha256] for rel, entry in files.items()}
        good = {rel: key for rel, key in good.items() if cached.get(rel) == key}
        todo = [rel for rel in files if rel not in good]
        if not todo:
            return
        start = time.perf_counter()
        biggest_first = sorted(todo, key=lambda rel: -stats[rel][0])  # the big weights files bound the wall time
        with ThreadPoolExecutor(min(HASH_THREADS, len(todo))) as pool:
            digests = dict(zip(biggest_first, pool.map(lambda rel: sha256_file(self.root / rel), biggest_first)))
        bad = [rel for rel in todo if digests[rel] != files[rel].sha256]  # manifest order
        for rel, digest in digests.items():
            # not recorded: a bad file, or one that changed while it was read (its stat is not what was hashed)
            if rel not in bad and _stat_key((self.root / rel).stat()) == stats[rel]:
                good[rel] = stats[rel] + [digest]
        _write_cache(cache_file, {"root": str(self.root.resolve()), "files": good})
        log.info("%s: sha256 of %d files (%.1f GB) in %.1f s", self.root, len(todo),
                 sum(stats[rel][0] for rel in todo) / 1e9, time.perf_counter() - start)
        if bad:
            raise PackageError(f"{self.root / bad[0]} does not match its sha256 in {MANIFEST} (corrupt or modified)")

    @property
    def graphs(self) -> dict[str, Graph]:
        return self.manifest.graphs

    @property
    def pipeline(self) -> Pipeline:
        return self.manifest.pipeline

    def has(self, graph: str) -> bool:
        return graph in self.graphs

    def graph_path(self, graph: str) -> Path:
        if graph not in self.graphs:
            raise PackageError(f"{self.root}: the package has no {graph!r} graph "
                               f"(exported: {', '.join(self.graphs)})")
        return self.root / self.graphs[graph].file

    def file(self, rel: str) -> Path:
        return self.root / rel


def _read_cache(path: Path) -> dict[str, Any]:
    """The recorded fingerprints; a missing, unreadable or malformed cache is an empty one."""
    try:
        files = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """Atomic, so a reader never sees half a cache; a cache that cannot be written costs the next
    open a full hash, never this load (warned once per folder)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(data))
    except OSError as e:
        if str(path.parent) not in _warned:
            _warned.add(str(path.parent))
            log.warning("cannot write the checksum cache %s (%s): every open hashes the whole package; "
                        "set %s to a writable folder", path.parent, e, CACHE_ENV)
