"""Reading an ONNX package: the manifest is the only contract with the exporter.

The runtime never imports the export side; it reads `manifest.json`, checks the format version and
(by default) every file's sha256, and hands out graph paths and the pipeline's source configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manifest import FORMAT, MANIFEST, SUPPORTED_VERSIONS, sha256_file

class PackageError(ValueError):
    """The package cannot be used; the message names the bad file."""


@dataclass(frozen=True)
class Package:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: Path | str, verify_files: bool = True) -> "Package":
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise PackageError(f"package folder {root} does not exist")
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise PackageError(f"{path} is missing: not an exported glm-image-onnx package") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{path} is malformed ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PackageError(f"{path}: not a glm-image-onnx manifest (format {manifest.get('format')!r})"
                               if isinstance(manifest, dict) else f"{path}: not a JSON object")
        version = manifest.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            older = isinstance(version, int) and version < min(SUPPORTED_VERSIONS)
            raise PackageError(f"{path}: format_version {version!r} is not supported by this runtime "
                               f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
                               + ("; re-export the checkpoint with this version" if older else ""))
        for key in ("graphs", "pipeline", "files"):
            if not isinstance(manifest.get(key), dict):
                raise PackageError(f"{path}: field {key!r} is missing or not an object")
        package = cls(root, manifest)
        if verify_files:
            package.verify_files()
        return package

    def verify_files(self) -> None:
        for rel, entry in self.manifest["files"].items():
            path = self.root / rel
            if not path.is_file():
                raise PackageError(f"{path} is missing (listed in {MANIFEST})")
            if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
                raise PackageError(f"{path} does not match its sha256 in {MANIFEST} (corrupt or modified)")

    @property
    def graphs(self) -> dict[str, Any]:
        return self.manifest["graphs"]

    @property
    def pipeline(self) -> dict[str, Any]:
        return self.manifest["pipeline"]

    def has(self, graph: str) -> bool:
        return graph in self.graphs

    def graph_path(self, graph: str) -> Path:
        if graph not in self.graphs:
            raise PackageError(f"{self.root}: the package has no {graph!r} graph "
                               f"(exported: {', '.join(self.graphs)})")
        return self.root / self.graphs[graph]["file"]

    def graph_config(self, graph: str) -> dict[str, Any]:
        return self.graphs[graph].get("config", {})

    def file(self, rel: str) -> Path:
        return self.root / rel
