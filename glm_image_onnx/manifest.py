"""The package manifest: the one contract between the exporter (and quantiser), which write it,
and the runtime and server, which read it. Format constants and checksums live here, once."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

FORMAT = "glm-image-onnx-package"
# 2: the AR planner's cache is a fixed-capacity buffer updated in place (seqlens_k and
# total_sequence_length replace attention_mask); a version 1 package needs re-exporting.
# 3: the package records its build target (`target`: provider and dtype) and the AR planner's cache
# contract (`kv_cache`: dtype, layout, capacity rule); a version 2 package reads as cpu / fp32.
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
# The AR planner's cache capacity: one slot per prompt token and per generated token (the only rule
# the runtime implements; a package that asks for another one is refused).
KV_CAPACITY_RULE = "prompt_tokens + new_tokens"
# Static-shapes packages (targets.Target.static_shapes): the smallest of the capacity buckets
# (manifest target.shape_buckets.capacity) that holds the padded prompt and prompt + new tokens.
KV_CAPACITY_BUCKETED = "capacity bucket >= max(prompt bucket, prompt_tokens + new_tokens)"
KV_LAYOUT = "[batch, num_kv_heads, capacity, head_dim]"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    # 4 MiB chunks: hashlib drops the GIL for each one, so threads can hash files side by side
    # (runtime.package); 1-16 MiB measured the same (~1.75 GB/s a core, SHA-NI), 16 MiB a bit slower.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` except the manifest itself."""
    table = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            table[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@contextmanager
def staged_package(out: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces `out` only when the block completes: a failed export
    or quantisation leaves nothing that looks like a package (write the manifest last)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
