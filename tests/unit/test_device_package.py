"""kiln_device: standard library only, never the builder; the contract both sides read; what images carry."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest

import kiln_device
from builder.image.render import finalize_plan, make_context
from builder.spec.loader import load_class
from builder.spec.schema import Disk
from kiln_device import contract
from kiln_device.agent.cli import make_parser
from kiln_device.agent.slot import check_tree
from kiln_device.agent.versions import Candidate

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(kiln_device.__file__).resolve().parent
RUNTIME_ONLY = {"inference.py", "server.py", "health.py"}  # run with the runtime venv's python
RUNTIME_PACKAGES = {"numpy", "onnxruntime"}
# kiln-agent runs with its own venv's python: python-tuf (trusted channels), cryptography (the device key)
AGENT_VENV_ONLY = {"trust.py", "cli.py", "identity.py"}
AGENT_VENV_PACKAGES = {"tuf", "cryptography"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_standard_library_only_and_never_the_builder(path: Path) -> None:
    allowed = set(sys.stdlib_module_names) | {"kiln_device"}
    if path.name in RUNTIME_ONLY:
        allowed |= RUNTIME_PACKAGES
    if path.name in AGENT_VENV_ONLY:
        allowed |= AGENT_VENV_PACKAGES
    foreign = imported_packages(path) - allowed
    assert not foreign, f"{path.relative_to(ROOT)} imports {', '.join(sorted(foreign))}"


def test_found_the_modules() -> None:
    names = {str(p.relative_to(PACKAGE)) for p in modules()}
    assert {"contract.py", "common.py", "agent/cli.py", "inference.py", "server.py", "health.py", "lint.py",
            "degraded.py", "gpu.py", "cdi.py"} <= names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_a_monolith(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 600  # as the builder (tests/unit/test_architecture.py)


# --- the contract -----------------------------------------------------------------------------


def plan(name: str = "qemu-x86_64"):  # type: ignore[no-untyped-def]
    return finalize_plan(load_class(name, ROOT / "images"), source=f"images/{name}.yaml",
                         version="1.2.3", revision="0123abc")


def test_release_json_carries_every_field_the_device_reads() -> None:
    typed = plan().release
    assert typed is not None
    release = contract.release_json(typed)
    assert set(release) == set(contract.RELEASE_FIELDS) and release["schemaVersion"] == contract.RELEASE_SCHEMA
    parsed = contract.parse_release(json.loads(json.dumps(release)))
    assert parsed == typed  # what the builder writes is what the device reads back
    assert parsed.version == "1.2.3" and parsed.boot_control in contract.BOOT_CONTROLS
    assert parsed.compression in contract.EROFS_COMPRESSORS
    assert parsed.kernel_args is not None and "console=ttyS0,115200n8" in parsed.kernel_args


def test_agent_json_only_has_keys_the_agent_knows() -> None:
    for name in ("qemu-x86_64", "medical-cart-cpu", "factory-gateway-gpu"):
        assert set(plan(name).agent_config) <= set(contract.AGENT_CONFIG_KEYS)


def test_labels_the_agent_reads_are_set() -> None:
    labels = dict(plan().labels)
    for key in (contract.LABEL_VERSION, contract.LABEL_COMPATIBLE, contract.LABEL_MIN_VERSION, contract.LABEL_CLASS,
                contract.LABEL_DEVELOPMENT):
        assert key in labels
    for name in ("qemu-x86_64", "medical-cart-cpu"):  # the label says what release.json says
        p = plan(name)
        assert p.release is not None
        assert dict(p.labels)[contract.LABEL_DEVELOPMENT] == ("true" if p.release.development else "false")


def test_every_compression_the_spec_allows_has_an_erofs_compressor() -> None:
    allowed = typing.get_args(Disk.model_fields["compression"].annotation)
    assert set(allowed) == set(contract.EROFS_COMPRESSORS)


@pytest.mark.parametrize(("compression", "compressor"), [("zstd", "zstd"), ("lz4hc", "lz4hc,12"), ("none", None)])
def test_an_update_writes_the_root_with_the_images_compression(tmp_path: Path, compression: str,
                                                               compressor: str | None) -> None:
    """The agent once had no zstd: an OTA update of a zstd class wrote an uncompressed root."""
    from tests.ota import release_files

    for rel, data in release_files(version="2.0.0", compression=compression).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    new = check_tree(tmp_path, Candidate(version="2.0.0", compatible="kiln,tiny", digest="sha256:" + "a" * 64))
    assert new.compressor == compressor
    assert new.kargs == ("console=ttyS0,115200n8", "panic=10")


def test_help_lists_every_exit_code() -> None:
    text = make_parser().format_help()
    for code in contract.AGENT_EXIT_CODES.values():
        assert f"\n  {code} " in text


# --- what images carry -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_context(plan(), tmp_path_factory.mktemp("render") / "ctx")


def test_the_context_carries_the_package(rendered: Path) -> None:
    copied = contract.under(rendered / "overlays", contract.PYTHON_DIR) / "kiln_device"
    ours = {p.relative_to(PACKAGE) for p in modules()}
    theirs = {p.relative_to(copied) for p in copied.rglob("*") if p.is_file()}
    assert theirs == ours  # sources only: no __pycache__
    for rel in ours:
        assert (copied / rel).read_bytes() == (PACKAGE / rel).read_bytes()
        assert (copied / rel).stat().st_mtime == 0
    assert contract.under(rendered / "overlays", contract.LAUNCHER).is_file()


def system_python() -> str:
    """The device's agent and lints run with the system python3, not the venv: no third-party packages."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3")
    return python


@pytest.mark.parametrize(("program", "needs_venv", "expected"), [
    ("kiln-agent", False, ["Exit codes:", "  0   ok", "  11  configuration missing or invalid", "  64  usage"]),
    ("kiln-lint", False, ["Lint a Kiln image rootfs."]),
    ("kiln-inference", True, ["Exit codes: 0 stopped"]),
    ("kiln-health-inference", True, ["64  usage", "4   service unreachable"]),
])
def test_launchers_run_from_the_rendered_tree(rendered: Path, program: str, needs_venv: bool,
                                              expected: list[str], tmp_path: Path) -> None:
    python = sys.executable if needs_venv else system_python()
    launcher = contract.under(rendered / "overlays", contract.LAUNCHER)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    r = subprocess.run([python, "-I", str(launcher), program, "--help"], capture_output=True, text=True,
                       timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for line in expected:
        assert line in r.stdout
    # Nothing written into the tree: /usr is read-only on the device.
    assert not list(launcher.parent.rglob("__pycache__"))


def test_launcher_refuses_an_unknown_program(rendered: Path) -> None:
    launcher = contract.under(rendered / "overlays", contract.LAUNCHER)
    r = subprocess.run([system_python(), "-I", str(launcher), "kiln-bogus"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 64 and "kiln-agent" in r.stderr


def test_units_and_wrappers_name_the_launcher() -> None:
    common = ROOT / "overlays/common/usr"
    for wrapper in ("bin/kiln-agent", "libexec/kiln/kiln-agent"):
        assert f"{contract.AGENT_VENV_PYTHON} -I {contract.LAUNCHER} kiln-agent" in (common / wrapper).read_text()
    assert f'{contract.LAUNCHER.lstrip("/")}" kiln-health-inference' in \
        (common / "libexec/kiln/kiln-health-inference").read_text()
    assert f'{contract.LAUNCHER.lstrip("/")}" kiln-health-gpu' in (common / "libexec/kiln/kiln-health-gpu").read_text()
    nvidia = ROOT / "overlays/nvidia/usr"
    assert f"/usr/bin/python3 -I {contract.LAUNCHER} kiln-cdi" in (nvidia / "libexec/kiln/kiln-cdi").read_text()
    assert "ExecStart=/usr/libexec/kiln/kiln-cdi" in (nvidia / "lib/systemd/system/kiln-nvidia-cdi.service").read_text()
    units = common / "lib/systemd/system"
    assert "ExecStart=/usr/libexec/kiln/kiln-health-gpu" in (units / "kiln-health-gpu.service").read_text()
    assert f"{contract.VENV_PYTHON} -I {contract.LAUNCHER} kiln-inference" in \
        (units / "kiln-inference.service").read_text()
    for unit in units.iterdir():
        for line in unit.read_text().splitlines():
            if line.startswith("Documentation=file://"):
                assert (PACKAGE.parent / "overlays/common").exists()
                rel = line.removeprefix("Documentation=file://").removeprefix(contract.PYTHON_DIR + "/")
                assert (PACKAGE.parent / rel).is_file(), line


def test_images_mask_the_gpt_auto_generator() -> None:
    """Its efi.automount idled the ESP out after two minutes and stopped kiln-agent.service mid-update."""
    mask = ROOT / "overlays/common/etc/systemd/system-generators/systemd-gpt-auto-generator"
    assert mask.is_symlink() and os.readlink(mask) == "/dev/null"
    rendered = make_context(plan(), Path(tempfile.mkdtemp(prefix="kiln-mask-")) / "ctx")
    try:
        copied = rendered / "overlays/etc/systemd/system-generators/systemd-gpt-auto-generator"
        assert copied.is_symlink() and os.readlink(copied) == "/dev/null"
    finally:
        shutil.rmtree(rendered.parent)


@pytest.mark.parametrize(("change", "where"), [
    ({"bootTries": "3"}, "bootTries: expected a whole number"),
    ({"rootCompression": "brotli"}, "rootCompression: 'brotli' (a string) is not one of"),
    ({"kernelArgs": "quiet"}, "kernelArgs: expected a list"),
    ({"models": [{"name": "m", "version": "1", "path": "/usr/share/kiln/m.onnx"}]}, "models[0].sha256: missing"),
    ({"bootTrys": 3}, "unknown key bootTrys"),
])
def test_an_image_with_a_malformed_release_json_is_refused_naming_the_field(tmp_path: Path, change: dict[str, object],
                                                                           where: str) -> None:
    """release.json is read through its record: a wrong field is a BAD_IMAGE refusal that says which
    field, never a KeyError or a silently defaulted value."""
    from kiln_device.errors import AgentError
    from tests.ota import release_files

    for rel, data in release_files(version="2.0.0").items():
        if rel == contract.RELEASE_JSON.lstrip("/"):
            data = json.dumps({**json.loads(data), **change}).encode()
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    with pytest.raises(AgentError) as refused:
        check_tree(tmp_path, Candidate(version="2.0.0", compatible="kiln,tiny", digest="sha256:" + "a" * 64))
    assert refused.value.code == contract.BAD_IMAGE
    assert f"{contract.RELEASE_JSON}: {where}" in refused.value.message, refused.value.message


def test_a_newer_release_json_may_carry_fields_this_device_does_not_know() -> None:
    """A later Kiln writes schemaVersion 2 with a field this agent has never heard of: the agent reads the
    fields it knows. In the schemaVersion it knows, the same field is a mistake."""
    base = {"class": "c", "compatible": "kiln,c", "version": "2.0.0", "uki": {"signed": True}}
    assert contract.parse_release({**base, "schemaVersion": contract.RELEASE_SCHEMA + 1}).version == "2.0.0"
    with pytest.raises(contract.ContractError, match=r"^release\.json: unknown key uki"):
        contract.parse_release({**base, "schemaVersion": contract.RELEASE_SCHEMA})


KILN_PATH = re.compile(r"(?<![\w.$-])/(?:usr/lib/kiln|var/lib/kiln|usr/share/kiln|run/kiln|etc/kiln)(?![\w-])"
                       r"(?:/[\w.@+-]*)*")


def test_every_kiln_path_in_the_overlays_is_one_the_contract_names() -> None:
    """The overlays (units, the initramfs hook, scripts) are copied as they are, so they restate device paths: each
    must be a path the contract names (docs/device-contract.md), a folder above one, or a file in one of its
    folders; a module path under the package must exist. Moving a path or a module in the contract without the
    overlays fails here, not on a device."""
    broad = {contract.LIB_DIR, contract.DATA_DIR}
    folders = {p for p in contract.PATHS if "." not in Path(p).name} - broad
    unknown = []
    for f in sorted((ROOT / "overlays").rglob("*")):
        if not f.is_file() or f.is_symlink():
            continue
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for m in KILN_PATH.finditer(text):
            p = m.group(0).rstrip("/.")
            if p.startswith(contract.PYTHON_DIR + "/"):
                ok = (PACKAGE.parent / p.removeprefix(contract.PYTHON_DIR + "/")).exists()
            else:
                ok = p in contract.PATHS or any(k.startswith(p + "/") for k in contract.PATHS) or \
                    any(p.startswith(d + "/") for d in folders)
            if not ok:
                unknown.append(f"{f.relative_to(ROOT)}: {p}")
    assert not unknown, unknown
    assert len(list((ROOT / "overlays").rglob("*.service"))) > 5  # it looked at the units
