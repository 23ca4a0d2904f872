"""The real `kiln` command: exit codes, no tracebacks, the documented verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, kiln


def test_validate_all_shipped_classes() -> None:
    r = kiln("validate")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok  ") == 7  # six class files and jetson-vision-standard's stand-in


def test_bad_spec_exit_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "images/qemu-x86_64.yaml").read_text()
    text = text.replace("  kernel:\n", "  kernal:\n").replace("precision: auto", "precision: int4", 1)
    text = text.replace("extends: _defaults", "extends: _defaults\n  name2: x")
    bad.write_text(text)
    (tmp_path / "_defaults.yaml").write_text((ROOT / "images/_defaults.yaml").read_text())
    r = kiln("validate", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert "has 3 errors" in r.stderr  # kernal, precision, name2: all at once
    assert "spec.kernal: unknown key (did you mean 'kernel'?)" in r.stderr
    assert "metadata.name2: unknown key (did you mean 'name'?)" in r.stderr


def test_render_writes_context(tmp_path: Path) -> None:
    r = kiln("render", "qemu-x86_64", "-o", str(tmp_path / "ctx"), "--version", "2.0.0", "--no-wheels")
    assert r.returncode == 0, r.stderr
    release = json.loads((tmp_path / "ctx/release/release.json").read_text())
    assert release["version"] == "2.0.0"
    assert (tmp_path / "ctx/Containerfile").read_text().startswith("# Rendered by kiln")


@pytest.mark.parametrize("args, code, message", [
    (("render", "nope"), 2, "no hardware class named 'nope'"),
    (("render", "qemu-x86_64", "--version", "1.0; rm -rf /"), 2, "--version:"),
    (("show", "images/missing.yaml"), 2, "no such file"),
    (("lint", "/nonexistent"), 2, "does not exist"),
])
def test_bad_input_exit_codes(args: tuple[str, ...], code: int, message: str) -> None:
    r = kiln(*args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_show_json_is_resolved() -> None:
    r = kiln("show", "medical-cart-cpu", "--json")
    data = json.loads(r.stdout)
    assert data["spec"]["disk"]["esp"] == 256 * 1024**2  # from _defaults.yaml
    digest = "sha256:3a75c664fbf8c540b0c75e9c0cac76828ee600bc58b4378c73a3d9a5eb2f0852"
    assert data["derived"]["baseRef"].endswith("@" + digest)


def test_list_json_says_why_not_buildable() -> None:
    r = kiln("list", "--json", "--no-probe")
    rows = {row["class"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"arm64-vision", "factory-gateway-gpu", "intel-lowpower-detector", "jetson-vision-standard",
                         "jetson-vision-standard-stand-in", "medical-cart-cpu", "qemu-x86_64"}
    assert any("Kiln bootstraps Debian bases only" in why for why in rows["jetson-vision-standard"]["whyNotBuildable"])


def test_a_fetched_model_must_be_written_under_dot_kiln(tmp_path: Path) -> None:
    """Found in review: `source` of a fetched model could name a tracked file, which Kiln overwrites."""
    bad = tmp_path / "intel-lowpower-detector.yaml"
    text = (ROOT / "images/intel-lowpower-detector.yaml").read_text()
    assert "source: .kiln/models/ch_PP-OCRv4_det_infer.onnx" in text
    bad.write_text(text.replace("source: .kiln/models/ch_PP-OCRv4_det_infer.onnx", "source: models/digits/digits.onnx"))
    (tmp_path / "_defaults.yaml").write_text((ROOT / "images/_defaults.yaml").read_text())
    r = kiln("validate", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "a fetched model is written by Kiln, so its source must be under .kiln/" in r.stderr


def test_fetched_model_wheels_are_cached_in_the_state_directory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: the wheels fetched models come from went to <project>/.kiln whatever KILN_STATE_DIR
    said, the one cache that did not follow it."""
    from builder.model.fetch import cache_dir

    monkeypatch.setenv("KILN_STATE_DIR", str(tmp_path / "state"))
    assert cache_dir() == tmp_path / "state/cache/model-wheels"
    monkeypatch.delenv("KILN_STATE_DIR")
    assert cache_dir() == ROOT / ".kiln/cache/model-wheels"
