"""The GPU class under `fallback.policy: fail`, on a device without a GPU: its trial boot is rolled back.

A factory-flashed GPU gateway runs 0.9.0-accel (policy degrade: healthy, degraded to the CPU).
Its disk is written with its own settings in /etc (`kiln disk --etc`): the registry on the
host, and the agent's timer brought forward so the test need not wait the production 5-15
minutes. The release engineer then publishes 0.9.1-accel, the same class with
`policy: fail`, signed with the release key the image trusts. The production device, with no
SSH and no guest agent, takes the update on its own, reboots into the new slot for a trial,
finds no GPU, fails the gpu-visible check, and every trial boot reboots
(kiln-trial-boot-generator's FailureAction) until systemd-boot's tries run out and it boots
the good slot; the agent records the rollback and blocklists the release.

Everything is read from the serial console while it runs and from the powered-off disk's
data partition after it: nothing logs in. About 30 minutes under TCG (a 4 GB slot written).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.projects import copy_project, in_project, project_dir
from builder.core import paths
from builder.disk import assemble, vm
from builder.disk.provision import parse_etc
from builder.keys.release_key import read_signing_key
from builder.release.publish import push_signed
from builder.release.registry import running_registry
from tests.accel.conftest import BOOT_TIMEOUT, GPU, HEALTHY, build, read_var
from tests.conftest import ROOT, require_tool
from tests.images import kiln_test_context

pytestmark = pytest.mark.accel

V2 = "0.9.1-accel"
KERNEL_SLOT = re.compile(r"Kernel command line: .*\bkiln\.slot=([ab])\b")
UPDATE_TIMEOUT = 3600.0  # healthy, then the whole update (fetch, unpack 4 GB, mkfs.erofs, write) under TCG
SOON = "[Timer]\nOnBootSec=\nOnBootSec=20s\nRandomizedDelaySec=0\n"  # production: 5 min + up to 10 min
CONSOLE = "[Service]\nStandardError=journal+console\n"  # the agent's progress on the serial console


@dataclass(frozen=True)
class PowerOn:
    slot: str | None
    healthy: bool  # the golden check passed; else the guest rebooted (QEMU exited)
    seconds: float
    console: str

    def __repr__(self) -> str:
        return f"slot {self.slot or '?'} {'healthy' if self.healthy else 'rebooted'} after {self.seconds:.0f} s"


def fail_policy_project(dest: Path) -> Path:
    """The project as the release engineer changes it: the GPU class's fallback policy is fail."""
    copy_project(dest)
    spec = dest / "images" / f"{GPU}.yaml"
    text = spec.read_text()
    degrade = re.search(r"policy: degrade\n\s+p95LatencyMs: \d+\n", text)
    assert degrade, "the class no longer declares policy degrade with its envelope"
    spec.write_text(text.replace(degrade.group(0), "policy: fail\n"))  # fail has no degraded envelope
    models = in_project(ROOT, lambda: paths.class_dir(GPU) / "models")  # the gated model, reused as is
    if models.is_dir():
        shutil.copytree(models, in_project(dest, lambda: paths.class_dir(GPU) / "models"))
    return dest


@contextlib.contextmanager
def power_on(cfg: vm.VMConfig, timeout: float) -> Iterator[tuple[vm.VM, PowerOn]]:
    """One power-on until the golden check passes or the guest reboots (QEMU runs with -no-reboot)."""
    with vm.start_vm(cfg) as machine:
        deadline = time.monotonic() + timeout
        healthy = False
        while time.monotonic() < deadline and machine.running:
            if machine.console_matches(HEALTHY):
                healthy = True
                break
            time.sleep(2)
        else:
            if machine.running:
                raise machine.error(f"neither healthy nor rebooted within {timeout:.0f} s")
        console = machine.console_text()
        found = KERNEL_SLOT.search(console)
        yield machine, PowerOn(found.group(1) if found else None, healthy, time.monotonic() - machine.started,
                               console)


def test_fail_policy_trial_is_rolled_back_on_a_device_without_gpu(
        gpu_build: dict[str, Any], release_key: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    for tool in ("qemu-system-x86_64", "mkfs.erofs", "skopeo", "debugfs", "docker-registry"):
        require_tool(tool)
    tmp = tmp_path_factory.mktemp("fail-policy")
    project = fail_policy_project(tmp / "project")
    with project_dir(project):
        v2 = build(GPU, release_key, project=project, version=V2)
    assert v2["contents"]["runtime"] == gpu_build["contents"]["runtime"]

    with running_registry(tmp / "registry", lookaside_dir=tmp / "signatures") as registry:
        assert registry.lookaside is not None
        with project_dir(project):
            push_signed(kiln_test_context(), GPU, V2, registry.address, key=read_signing_key(release_key),
                        lookaside_dir=tmp / "signatures", channel="stable", tls_verify=False)
        port, sig_port = registry.address.rsplit(":", 1)[1], registry.lookaside.rsplit(":", 1)[1]
        settings = tmp / "settings"
        settings.mkdir()
        (settings / "agent.json").write_text(json.dumps({
            "registry": f"{vm.HOST_FROM_GUEST}:{port}", "lookaside": f"http://{vm.HOST_FROM_GUEST}:{sig_port}",
            "insecure": True, "timeouts": {"fetch": 3600, "unpack": 3600, "build": 3600}}))
        (settings / "soon.conf").write_text(SOON)
        (settings / "console.conf").write_text(CONSOLE)
        etc = [parse_etc(f"kiln/agent.json={settings / 'agent.json'}"),
               parse_etc(f"systemd/system/kiln-agent.timer.d/50-soon.conf={settings / 'soon.conf'}"),
               parse_etc(f"systemd/system/kiln-agent.service.d/50-console.conf={settings / 'console.conf'}")]
        image = tmp / "disk.raw"
        assemble.make_disk(kiln_test_context(), gpu_build["image"]["ref"], output=image, version=gpu_build["version"],
                       etc=etc)
        try:
            cfg = vm.VMConfig(disk=image, memory_mib=6144, workdir=tmp / "vm", no_reboot=True)
            boots: list[PowerOn] = []
            # 1. The factory image: healthy (degraded), then the agent takes 0.9.1 and reboots into it.
            with power_on(cfg, BOOT_TIMEOUT) as (machine, first):
                boots.append(first)
                assert first.healthy and first.slot == "a", (first, first.console[-3000:])
                machine.wait_exit(UPDATE_TIMEOUT)
                update_console = machine.console_text()
            assert re.search(r"kiln-agent: .*0\.9\.1-accel", update_console), update_console[-4000:]
            # 2. Trial boots of 0.9.1 on slot b: no GPU, policy fail, each reboots; then slot a again.
            for _ in range(6):
                with power_on(cfg, BOOT_TIMEOUT) as (machine, boot):
                    boots.append(boot)
                    if boot.healthy:
                        assert machine.wait_for_console(r"failed on this device before", 600)
                        machine.poweroff()
                        break
            trials, last = boots[1:-1], boots[-1]
            assert [b.slot for b in trials] == ["b", "b", "b"], boots  # bootTries: 3
            for trial in trials:
                assert re.search(r"kiln-health-gpu: gpu-missing \(exit 1\)", trial.console), trial.console[-3000:]
                assert "the class's fallback policy is fail" in trial.console
                assert "reboot: Restarting system" in trial.console
            assert last.healthy and last.slot == "a", boots
        finally:
            state = read_var(image, "lib/kiln/agent/state.json") if image.exists() else None
            image.unlink(missing_ok=True)
    assert state is not None
    assert [rb["version"] for rb in state["rollbacks"]] == [V2], state
    assert V2 in json.dumps(state.get("blocklist")), state
