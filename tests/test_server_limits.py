"""The request bounds (server.limits): one declaration gives the flags, the model config parameters
and the README's table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from glm_image_onnx.server import limits as L
from glm_image_onnx.server.limits import ComponentLimits, ConnectionLimits, Limits

README = Path(__file__).resolve().parents[1] / "server" / "README.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    L.add_arguments(parser, Limits, ComponentLimits)
    return parser


def test_flags_give_the_declared_defaults_and_units() -> None:
    args = _parser().parse_args([])
    assert L.from_arguments(args, Limits) == Limits() and L.from_arguments(args, ComponentLimits) == ComponentLimits()
    args = _parser().parse_args(["--max-image-mb", "2", "--max-side", "512", "--max-guidance", "7.5"])
    limits = L.from_arguments(args, Limits)
    assert (limits.max_image_bytes, limits.max_side, limits.max_guidance) == (2 << 20, 512, 7.5)


@pytest.mark.parametrize("argv, owner, message", [
    (["--max-side", "16"], Limits, "--max-side must be >= 32, got 16"),
    (["--max-steps", "0"], Limits, "--max-steps must be >= 1, got 0"),
    (["--max-guidance", "-1"], Limits, "--max-guidance must be >= 0, got -1.0"),
    (["--max-axis-size", "0"], ComponentLimits, "--max-axis-size must be >= 1, got 0"),
])
def test_a_bound_below_its_minimum_names_the_flag(argv: list[str], owner: type, message: str) -> None:
    args = _parser().parse_args(argv)
    with pytest.raises(ValueError, match=f"^{message}$"):
        L.from_arguments(args, owner)


def test_model_config_parameters_round_trip() -> None:
    limits = Limits(max_side=640, max_steps=7, max_guidance=3.5, max_image_bytes=5 << 20)
    params = L.to_parameters(limits)
    assert params["max_side"] == "640" and params["max_image_bytes"] == str(5 << 20) and "max_pixels" not in params
    assert L.from_parameters(Limits, params) == limits


def test_the_readme_table_is_the_declaration() -> None:
    text = README.read_text()
    start = text.index("<!-- limits: python -m glm_image_onnx.server.limits -->\n")
    table = text[start:text.index("<!-- end limits -->")].split("\n", 1)[1]
    assert table == L.markdown_table(Limits, ComponentLimits, ConnectionLimits) + "\n"


def test_triton_repo_flags_reach_the_python_models_config(tiny_package: Path, tmp_path: Path) -> None:
    from glm_image_onnx.cli import main
    from glm_image_onnx.server.triton_repo import read_config

    out = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_package), str(out), "--no-components", "--max-side", "640",
                 "--max-steps", "7"]) == 0
    params = {k: v.string_value for k, v in read_config(out / "glm_image" / "config.pbtxt").parameters.items()}
    assert L.from_parameters(Limits, params) == Limits(max_side=640, max_steps=7)  # what model.py reads back
    assert main(["triton-repo", str(tiny_package), str(tmp_path / "bad"), "--max-steps", "0"]) == 2
