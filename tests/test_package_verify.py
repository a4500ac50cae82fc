"""The checksum cache: a package is hashed once, later opens trust files whose stat is unchanged,
--verify ("full") hashes everything again, and nothing about the cache can fail a load."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from glm_image_onnx.manifest import FORMAT, FORMAT_VERSION, Manifest, Pipeline, Tokens, Vae, file_table
from glm_image_onnx.provider_args import add_provider_arguments, provider_settings
from glm_image_onnx.runtime import Package, PackageError
from glm_image_onnx.runtime import package as package_mod


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder (never ~/.cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(package_mod.CACHE_ENV, str(folder))
    return folder


@pytest.fixture()
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files Package.open hashes, in the order it hashed them."""
    names: list[str] = []
    real = package_mod.sha256_file

    def counting(path: Path) -> str:
        names.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(package_mod, "sha256_file", counting)
    return names


@pytest.fixture()
def pkg(tmp_path: Path) -> Path:
    """A minimal package: three files and a manifest with their real sizes and sha256."""
    root = tmp_path / "pkg"
    (root / "processor").mkdir(parents=True)
    (root / "a.onnx").write_bytes(os.urandom(3000))
    (root / "a.weights").write_bytes(os.urandom(70_000))
    (root / "processor" / "tokenizer.json").write_text('{"model": {}}')
    pipeline = Pipeline(tokens=Tokens(1, 2, 3, None, 8, 8), vae=Vae(8, 4, [0.0] * 4, [1.0] * 4), scheduler={})
    Manifest(FORMAT, FORMAT_VERSION, graphs={}, pipeline=pipeline, files=file_table(root)).write(root)
    return root


def flip_byte(path: Path) -> None:
    """Same size, different bytes."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "verified").glob("*.json"))


def test_first_open_hashes_and_records_then_trusts(pkg: Path, cache: Path, hashed: list[str]) -> None:
    before = sorted(pkg.rglob("*"))
    Package.open(pkg)
    assert sorted(pkg.rglob("*")) == before  # the cache lives outside the package
    assert sorted(hashed) == ["a.onnx", "a.weights", "tokenizer.json"]
    [record] = cache_files(cache)
    assert set(json.loads(record.read_text())["files"]) == {"a.onnx", "a.weights", "processor/tokenizer.json"}
    hashed.clear()
    Package.open(pkg)
    Package.open(pkg, verify_files=True)  # the old spelling of the default
    assert hashed == []


def test_touched_file_is_hashed_again(pkg: Path, hashed: list[str]) -> None:
    Package.open(pkg)
    hashed.clear()
    st = (pkg / "a.weights").stat()
    os.utime(pkg / "a.weights", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    Package.open(pkg)
    assert hashed == ["a.weights"]  # only the touched file; it still matches, so it is recorded again
    hashed.clear()
    Package.open(pkg)
    assert hashed == []


def test_same_size_modification_is_caught(pkg: Path, hashed: list[str]) -> None:
    Package.open(pkg)
    hashed.clear()
    flip_byte(pkg / "a.weights")
    with pytest.raises(PackageError, match=r"a\.weights does not match its sha256"):
        Package.open(pkg)
    assert hashed == ["a.weights"]
    with pytest.raises(PackageError, match=r"a\.weights does not match"):  # the bad file was not recorded
        Package.open(pkg)


def test_size_is_checked_even_when_cached(pkg: Path, hashed: list[str]) -> None:
    Package.open(pkg)
    hashed.clear()
    with open(pkg / "a.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(PackageError, match=r"a\.onnx does not match its sha256 .*3001 bytes, the manifest lists 3000"):
        Package.open(pkg)
    assert hashed == []  # a stat, not a read


def test_full_hashes_everything_and_ignores_the_cache(pkg: Path, cache: Path, hashed: list[str]) -> None:
    Package.open(pkg)
    flip_byte(pkg / "a.onnx")
    # A cache that vouches for the corrupted file as it now is (what a restored ctime or a stale
    # cache on a filesystem without stable ctimes would look like): "cached" trusts it ...
    [record] = cache_files(cache)
    data = json.loads(record.read_text())
    data["files"]["a.onnx"][:4] = package_mod._stat_key((pkg / "a.onnx").stat())
    record.write_text(json.dumps(data))
    hashed.clear()
    Package.open(pkg)
    assert hashed == []
    # ... "full" does not.
    with pytest.raises(PackageError, match=r"a\.onnx does not match its sha256"):
        Package.open(pkg, verify_files="full")
    assert sorted(hashed) == ["a.onnx", "a.weights", "tokenizer.json"]
    hashed.clear()
    with pytest.raises(PackageError, match=r"a\.onnx does not match"):  # and the refreshed cache forgot it
        Package.open(pkg)
    assert hashed == ["a.onnx"]


def test_cache_entry_must_carry_the_manifests_sha256(pkg: Path, hashed: list[str]) -> None:
    Package.open(pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["a.onnx"]["sha256"] = "0" * 64  # the manifest now expects other bytes
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    hashed.clear()
    with pytest.raises(PackageError, match=r"a\.onnx does not match its sha256"):
        Package.open(pkg)
    assert hashed == ["a.onnx"]


def test_off_skips_and_records_nothing(pkg: Path, cache: Path, hashed: list[str]) -> None:
    flip_byte(pkg / "a.onnx")
    Package.open(pkg, verify_files="off")
    Package.open(pkg, verify_files=False)
    assert hashed == [] and cache_files(cache) == []


@pytest.mark.parametrize("value", ["yes", "", None, 1])
def test_bad_mode_is_a_value_error(pkg: Path, value: object) -> None:
    with pytest.raises(ValueError, match="verify_files must be one of cached, full, off"):
        Package.open(pkg, verify_files=value)  # type: ignore[arg-type]


def test_unwritable_cache_still_loads(pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture, hashed: list[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a file where the folder should be: mkdir fails, even for root
    monkeypatch.setenv(package_mod.CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger=package_mod.__name__):
        Package.open(pkg)
        Package.open(pkg)
    assert len(hashed) == 6  # nothing could be recorded, so both opens hash
    warnings = [r for r in caplog.records if "cannot write the checksum cache" in r.getMessage()]
    assert len(warnings) == 1  # once, not once per open


def test_malformed_cache_is_ignored(pkg: Path, cache: Path, hashed: list[str]) -> None:
    Package.open(pkg)
    [record] = cache_files(cache)
    record.write_text("{ not json")
    hashed.clear()
    Package.open(pkg)
    assert len(hashed) == 3
    assert len(json.loads(record.read_text())["files"]) == 3  # rewritten whole


def test_tiny_package_copy_is_hashed_once(tiny_package: Path, tmp_path: Path, hashed: list[str]) -> None:
    copy = Path(shutil.copytree(tiny_package, tmp_path / "tiny"))
    Package.open(copy)
    assert len(hashed) == len(json.loads((copy / "manifest.json").read_text())["files"])
    hashed.clear()
    Package.open(copy)
    assert hashed == []


@pytest.mark.parametrize("flags, expected", [([], True), (["--verify"], "full"), (["--no-verify"], False)])
def test_cli_flags(flags: list[str], expected: object) -> None:
    parser = argparse.ArgumentParser()
    add_provider_arguments(parser)
    assert provider_settings(parser.parse_args(flags))["verify_files"] == expected
    assert package_mod.verify_mode(expected) == {True: "cached", "full": "full", False: "off"}[expected]


def test_cli_verify_flags_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_provider_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--verify", "--no-verify"])
    assert "not allowed with argument" in capsys.readouterr().err
