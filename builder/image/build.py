"""`kiln build`: spec -> optimized model -> build context -> OCI image -> build record.

    record = build_class(make_context(), hc, source="images/qemu-x86_64.yaml", version="1.0.0")
    record["image"]["id"]            # sha256 of the image config: same inputs, same id
    builder.release.publish.push_build(hc.name, "1.0.0", "127.0.0.1:5000")

Steps, each timed (builder.core.progress.Steps) and stored in the record:

1. checks that fail fast: the engine (installed, new enough), what this
   machine lacks for the class (foreign architecture, a registry base not in
   local storage, vendor repositories out of reach);
2. the offline base (`kiln base`) when the class bootstraps one and it is missing;
3. the models: optimized and gated (a refused model stops the build, exit 5);
   a passing report for the same inputs is reused;
4. the context, rendered into build/<class>/<version>/context;
5. the engine build, `--timestamp` fixed (SOURCE_DATE_EPOCH or 2025-01-01),
   so the same inputs give the same image id; for apt classes in three steps: the OS stage
   (`--target os`), its layers rechunked by Debian package (builder.image.rechunk, once per OS stage),
   then the image FROM the rechunked OS;
6. build/<class>/<version>/build.json: image id and digest, every layer with its
   group (base, os, drivers, kernel, runtime, agent, model, release, lint; a rechunked
   layer's createdBy names its chunk), the OS stage (`osStage`),
   base, models and durations. A failed build leaves no build.json behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from builder.base import pins, wheels
from builder.base.bootstrap import make_base_for_class
from builder.base.capability import why_not_buildable
from builder.base.emulation import needs_emulation
from builder.base.mirrors import BaseMirror, finalize_base_mirror
from builder.core import paths, records
from builder.core.context import Context
from builder.core.engine import ImageInfo
from builder.core.errors import BuildError, KilnError, UsageError
from builder.core.run import run
from builder.core.secrets import key_passphrase
from builder.core.versions import DEFAULT_EPOCH, release_version
from builder.image import boot, rechunk, render
from builder.keys import device_files, release_key, secureboot
from builder.model import for_class as model_glue
from builder.spec import names
from builder.spec.contents import finalize_contents
from builder.spec.names import image_ref
from builder.spec.schema import BaseSource, HardwareClass
from kiln_device.version import Version

KERNEL_LABEL = "dev.kiln.base.kernel"  # set by `kiln base` (builder.base.bootstrap.finalize_image_config)

# -- inputs ---------------------------------------------------------------------------


def finalize_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return DEFAULT_EPOCH
    if not raw.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} is not a number of seconds")
    return int(raw)


def finalize_revision(root: Path) -> str:
    """The git commit of the project (with -dirty when the tree has changes), or 'unknown'."""
    if not (root / ".git").exists():
        return "unknown"
    try:
        head = run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture=True, quiet=True)
        dirty = run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture=True, quiet=True)
    except KilnError:
        return "unknown"
    return head.stdout.decode().strip() + ("-dirty" if dirty.stdout.strip() else "")


# -- layers ---------------------------------------------------------------------------


def finalize_layers(info: ImageInfo, lead: list[str], layer_groups: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each layer of the built image with its group: the image FROM's own (LEAD: the base's, or the
    rechunked OS stage's), then the rendered plan's."""
    groups = lead + list(layer_groups)
    if len(groups) != len(info["layers"]):  # an engine that squashed or skipped layers: say so, do not guess
        groups = ["unknown"] * len(info["layers"])
    return [{"diffId": layer["diff_id"], "size": layer["size"], "group": group,
             "createdBy": layer["created_by"][:200]}
            for layer, group in zip(info["layers"], groups, strict=True)]


def finalize_base_record(mirror: BaseMirror | None) -> dict[str, Any]:
    """Where a bootstrap base actually came from (build.json `base`); nothing for a registry base."""
    if mirror is None:
        return {}
    return {"mirror": mirror.url, "snapshot": mirror.snapshot, "fallback": mirror.fallback}


def finalize_built_contents(hc: HardwareClass, labels: dict[str, str]) -> dict[str, Any]:
    """build.json `contents`: what the image holds (builder.spec.contents), with the kernel release read
    from the built image (its base's dev.kiln.base.kernel label: the kernel lint allows one kernel,
    and the nvidia-vermagic lint proved, inside the build, that the modules were built for it)."""
    contents = finalize_contents(hc)
    kernel = labels.get(KERNEL_LABEL)
    contents["kernel"] = kernel
    if contents["driver"] is not None and contents["driver"]["kernelModules"] == "image":
        contents["driver"]["builtFor"] = kernel
    return contents


# -- the development SSH key ------------------------------------------------------------


def make_dev_ssh_key(hc: HardwareClass) -> str | None:
    """build/<class>/ssh/id_ed25519 for development classes (made once, kept); its public key."""
    if not hc.spec.development or not hc.spec.access.ssh:
        return None
    key = paths.ssh_key_path(hc.name)
    pub = key.with_name("id_ed25519.pub")
    if not (key.is_file() and pub.is_file()):
        key.parent.mkdir(parents=True, exist_ok=True)
        key.unlink(missing_ok=True)
        pub.unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kiln-dev@{hc.name}", "-f", key], quiet=True)
    return pub.read_text().strip()


# -- the build ------------------------------------------------------------------------


def build_class(
    ctx: Context,
    hc: HardwareClass,
    *,
    source: str,
    version: Version | str = render.DEFAULT_VERSION,
    revision: str | None = None,
    no_cache: bool = False,
    sign_key: Path | None = None,
) -> dict[str, Any]:
    """Build one class into the engine's store; return (and write) its build record."""
    version = release_version(version, where="--version")  # checked once; its renderings from here
    ref = image_ref(hc.name, version)
    state, steps, eng = ctx.state, ctx.steps, ctx.engine
    mark = steps.mark()
    record_file = paths.record_path(hc.name, version)
    epoch = finalize_epoch()
    # another architecture's image (its RUN steps under qemu-user); the host's builds as they always did
    platform = hc.spec.architecture.oci_platform if needs_emulation(hc.spec.architecture) else None
    revision = revision or finalize_revision(paths.project_root())
    try:
        with steps.step("check the engine and the class"):
            engine_version = eng.version()
            reasons = why_not_buildable(hc, tools=False)
            if reasons:
                raise BuildError(f"{hc.name} cannot be built on this machine: " + "; ".join(reasons))
        record_file.parent.mkdir(parents=True, exist_ok=True)
        base_id, mirror = None, None
        if hc.spec.base.source is BaseSource.bootstrap:
            mirror = finalize_base_mirror(hc)  # the snapshot, or spec.base.fallbackMirror when out of reach
            if mirror.fallback:
                steps.say(f"{hc.name}: {mirror.note}")
        # Pins first: a driver version the base's mirror does not serve (pins.check_driver_pins) or a
        # wheel the index does not publish (pins.check_pins) is refused in seconds, not after the
        # base and the models.
        with steps.step("the driver's pins"):
            pins.check_driver_pins(hc, source, pins.spec_lines(source), mirror)
        with steps.step("the runtime's wheels"):
            wheelhouse = pins.make_checked_wheelhouse(hc, state, source)
            agent_wheelhouse = wheels.make_agent_wheelhouse(hc, state)
        if mirror is not None:
            with steps.step("offline base"):
                base_id = make_base_for_class(ctx, hc, mirror).image_id
        with steps.step("optimize and gate the models"):
            model_glue.make_optimized_models(hc, steps.say, reuse=True, state=state, source=source)
            artifacts = model_glue.finalize_model_artifacts(hc, require_optimized=True)
        with steps.step("render the build context"):
            key = release_key.resolve_signing_key(hc, sign_key)
            plan = render.finalize_plan(hc, source=source, version=str(version), revision=revision,
                                        models=artifacts, ssh_public_key=make_dev_ssh_key(hc), epoch=epoch,
                                        device_files=device_files.finalize_device_files(hc.name, key), base=mirror)
            context = render.make_context(plan, paths.context_dir(hc.name, version), wheelhouse, agent_wheelhouse)
            layer_groups = render.finalize_containerfile(plan).layer_groups
        created = datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # From here the tag may move: a failed build must not leave the last record looking current.
        # (Refusals before this point, such as a missing tool or a failed gate, leave it as it was.)
        record_file.unlink(missing_ok=True)
        build_args = {"VERSION": str(version), "REVISION": revision, "CREATED": created}
        lead: list[str] = []
        os_stage: dict[str, Any] = {}
        if plan.rechunk:
            stage_ref = names.os_stage_ref(hc.name)
            with steps.step(f"build the OS stage with {eng.name}"):
                stage_id = eng.build(context, context / "Containerfile", stage_ref, {}, epoch, no_cache=no_cache,
                                     target="os", platform=platform)
            with steps.step("rechunk the OS stage by package"):
                os_ref, table = rechunk.make_rechunked_os(eng, ctx.state, hc.name, stage_id, epoch, force=no_cache,
                                                          say=steps.say)
                build_args["KILN_OS_IMAGE"] = os_ref
                lead = ["os"] * len(table)
                os_stage = {"stage": stage_id, "rechunked": os_ref, "recipe": rechunk.RECIPE, "layers": table}
            layer_groups = tuple(g for g in layer_groups if g not in render.OS_STAGE_GROUPS)
        with steps.step(f"build {ref} with {eng.name}"):
            image_id = eng.build(context, context / "Containerfile", ref, build_args, epoch, no_cache=no_cache,
                                 platform=platform)
        boot_record: dict[str, Any] = {}
        if hc.spec.secure_boot:
            with steps.step("verified boot: bind the root's layers to signed UKIs"):
                made = make_verified_boot(ctx, hc, key, ref=ref, image_id=image_id, version=str(version), epoch=epoch)
                image_id = made.image_id
                layer_groups = (*layer_groups, boot.BOOT_GROUP)
                boot_record = {"kind": boot.BOOT_KIND, "layers": made.digest, "ukiSize": made.uki_size,
                               "ukis": {slot: f"sha256:{sha}" for slot, sha in made.ukis.items()},
                               "secureBootKey": made.db_fingerprint}
        with steps.step("record the build"):
            info = eng.inspect(image_id)
            base_info = eng.inspect(plan.base_ref) if eng.exists(plan.base_ref) else None
            if not plan.rechunk:
                lead = ["base"] * (len(base_info["layers"]) if base_info else 0)
            layers = finalize_layers(info, lead, layer_groups)
    except KilnError as exc:
        raise exc.with_context(f"building {hc.name} {version}") from exc.__cause__
    model_layers = [layer["diffId"] for layer in layers if layer["group"] == "model"]
    record: dict[str, Any] = {
        "schemaVersion": records.RECORD_SCHEMA,
        "class": hc.name,
        "compatible": hc.spec.compatible,
        "version": str(version),
        "revision": revision,
        "created": created,
        "engine": {"name": eng.name, "version": engine_version, "reproducible": eng.reproducible},
        "image": {"ref": ref, "id": info["id"], "digest": info["digest"], "size": info["size"],
                  "architecture": info["architecture"]},
        "base": {"ref": plan.base_ref, "id": base_id or (base_info["id"] if base_info else None),
                 **finalize_base_record(mirror)},
        "models": [{"name": a.name, "version": a.version, "precision": a.precision,
                    "sha256": f"sha256:{a.sha256}", "layer": model_layers[i] if i < len(model_layers) else None}
                   for i, a in enumerate(artifacts)],
        "layers": layers,
        "osStage": os_stage,  # apt: the OS stage's id and its rechunked image (builder.image.rechunk); else {}
        # spec.secureBoot: the layer list digest the UKIs bind (builder.image.boot); else {}
        "boot": boot_record,
        "contents": finalize_built_contents(hc, info["labels"]),
        "labels": info["labels"],
        "context": str(context),
        "releaseKey": {"fingerprint": key.fingerprint, "directory": str(key.directory)},
        "durations": steps.summary(since=mark),
        "pushed": [],
    }
    records.write_record(record)
    return record


@dataclass(frozen=True)
class VerifiedBoot:
    image_id: str
    digest: str
    uki_size: int
    ukis: dict[str, str]
    db_fingerprint: str


def make_verified_boot(ctx: Context, hc: HardwareClass, key: release_key.SigningKey, *, ref: str, image_id: str,
                       version: str, epoch: int) -> VerifiedBoot:
    """The boot layer (builder.image.boot), signed with the Secure Boot keys beside the release key."""
    development = release_key.is_development_key(key)
    keys = secureboot.resolve_secureboot_keys(key.directory, development=development)
    passphrase = None if development else key_passphrase()
    made = boot.make_boot_layer(ctx, cls=hc.name, version=version, ref=ref, image_id=image_id,
                                architecture=hc.spec.architecture.value, compression=hc.spec.disk.compression,
                                keys=keys, passphrase=passphrase, epoch=epoch,
                                workdir=paths.context_dir(hc.name, version).with_name("boot"))
    return VerifiedBoot(made.image_id, made.digest, made.uki_size, made.ukis, keys.fingerprint("db"))
