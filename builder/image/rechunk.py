"""Rechunking: the OS stage's layers rewritten as one layer per group of Debian packages.

    ref, table = make_rechunked_os(engine, state, "qemu-x86_64", stage_id, epoch)
    # FROM ref: the same files, in layers where one package's update moves one small layer

Why: the OS part of an apt image (the mmdebstrap base, the base OS packages, the class's packages)
is a few large layers. An update of one Debian package (a security fix to libssl3) rebuilt
them all: about 65 % of the image over the wire (issue 18). rpm-ostree and chunkah solve this by
regrouping an image's files by the package that owns them; this does the same for dpkg.

How: the stage's layers are merged in memory (OCI whiteouts and opaque directories applied),
each file gets the Debian *source* package that owns it (`/var/lib/dpkg/info/*.list`, with
merged-/usr paths resolved; bytecode under `__pycache__` goes with its `.py`; dpkg's own
per-package files with their package), and each source package goes to:

- a layer of its own when its files add up to `OWN_LAYER_BYTES` or more (the kernel, Python);
- else one of `BUCKETS` layers, picked by a hash of its name: stable, so adding, removing or
  updating a package never moves another package to a different layer;
- the last layer, `rest`, holds what no package owns (dpkg's status, debconf's cache,
  `ld.so.cache`, users and groups) and every directory: it changes with every package update, and is
  small.

Each layer carries the parent directories of what it holds, with the merged tree's metadata,
so the stacked layers give exactly the merged tree, whatever the order. Hard links stay hard
links within a layer, and become copies across layers. Everything is sorted, directory times
are set to the build's epoch: the same stage gives the same layers, byte for byte.

The result is loaded into the engine as `<class>/os-chunks:<stage id>-r<RECIPE>`; when that tag
already exists with the layers its table (in the state directory) lists, nothing is done, unless
forced (`kiln build --no-cache`: a cold build rechunks again, and must give the same bytes).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from builder.core.engine import Engine
from builder.core.errors import BuildError
from builder.core.files import write_json_atomic
from builder.core.state import StateDir

RECIPE = 1  # bump when the grouping changes: every layer moves once
BUCKETS = 12
OWN_LAYER_BYTES = 12 * 1024 * 1024  # uncompressed; a source package this large gets a layer of its own
REST = "rest"
DPKG_INFO = "var/lib/dpkg/info/"
# Files that a package's trigger generates in a directory it shares with other packages (udev's hwdb.bin).
GENERATED = {"usr/lib/udev/hwdb.bin": "systemd"}  # systemd-hwdb update (udev)
PYC = re.compile(r"^(?P<dir>.*)/__pycache__/(?P<stem>[^/.]+)\.[^/]*\.pyc$")


# -- the merged tree ---------------------------------------------------------------------


@dataclass
class Entry:
    """One path of the merged tree: the tar member that made it, and which layer file holds it.

    `data` is the member whose bytes the file has: itself, or for a hard link the regular file it
    links to (as that file was when the link was made)."""

    layer: int
    info: tarfile.TarInfo
    data: Entry | None = None


@dataclass
class Tree:
    entries: dict[str, Entry] = field(default_factory=dict)

    def drop_under(self, path: str, below_layer: int) -> None:
        """Remove PATH's descendants that come from a lower layer (a whiteout or a replaced directory)."""
        prefix = path + "/" if path else ""
        for key in [k for k, e in self.entries.items() if k.startswith(prefix) and e.layer < below_layer]:
            del self.entries[key]

    def apply(self, layer: int, members: Iterable[tarfile.TarInfo]) -> None:
        """Apply one layer's members on top of the tree (OCI image spec: changesets)."""
        for info in members:
            path = norm(info.name)
            if not path:
                continue
            parent, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                self.drop_under(parent, layer)
            elif base.startswith(".wh."):
                gone = f"{parent}/{base[4:]}" if parent else base[4:]
                removed = self.entries.pop(gone, None)
                if removed is None or removed.info.isdir():
                    self.drop_under(gone, layer)
            else:
                old = self.entries.get(path)
                if old is not None and old.info.isdir() and not info.isdir():
                    self.drop_under(path, layer)
                if info.issparse():
                    raise BuildError(f"layer {layer}: {path} is a sparse file, which rechunking does not copy")
                entry = Entry(layer, info)
                if info.islnk():
                    target = self.entries.get(norm(info.linkname))
                    if target is None or target.info.isdir():
                        raise BuildError(f"layer {layer}: hard link {path} -> {info.linkname}: no such file")
                    entry.data = target.data or target
                self.entries[path] = entry

    def resolve_parent(self, path: str) -> str:
        """PATH with the symbolic links among its parent directories resolved (merged /usr: /bin -> usr/bin)."""
        parts = path.split("/")
        done: list[str] = []
        hops = 0
        while len(parts) > 1:
            head = parts.pop(0)
            cand = "/".join([*done, head])
            entry = self.entries.get(cand)
            if entry is not None and entry.info.issym() and hops < 40:
                hops += 1
                target = entry.info.linkname
                base = [] if target.startswith("/") else done
                parts = [p for p in [*base, *target.split("/"), *parts] if p and p != "."]
                done = []
                # `..` in a link: fold it
                folded: list[str] = []
                for p in parts:
                    if p == ".." and folded:
                        folded.pop()
                    elif p != "..":
                        folded.append(p)
                parts = folded
                continue
            done.append(head)
        return "/".join([*done, *parts])


def norm(name: str) -> str:
    return name.lstrip("/").removeprefix("./").lstrip("/").rstrip("/")


# -- who owns what ---------------------------------------------------------------------


def finalize_sources(status: str) -> dict[str, str]:
    """dpkg's status file: each installed binary package's source package (itself when none is given)."""
    out: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields or not fields.get("Status", "").endswith(" installed"):
            continue
        source = fields.get("Source", fields["Package"]).split(" ", 1)[0]
        out[fields["Package"]] = source
    return out


def finalize_owners(tree: Tree, read: Any) -> dict[str, str]:
    """Each non-directory path of TREE -> the source package that owns it (paths nobody owns: absent).

    READ(entry) gives a regular file's bytes."""
    status = tree.entries.get("var/lib/dpkg/status")
    if status is None:
        raise BuildError("the OS stage has no /var/lib/dpkg/status: rechunking needs an apt (dpkg) image")
    sources = finalize_sources(read(status).decode("utf-8", "surrogateescape"))
    generated = {path: src for path, src in GENERATED.items() if src in set(sources.values())}
    owners: dict[str, str] = {}
    for path, entry in sorted(tree.entries.items()):
        if not path.startswith(DPKG_INFO) or entry.info.isdir():
            continue
        name = path[len(DPKG_INFO):]
        package = name.rsplit(".", 1)[0].split(":", 1)[0]  # <package>[:<arch>].<what>: names have dots
        source = sources.get(package)
        if source is None:
            continue
        owners[path] = source
        if name.endswith(".list") and entry.info.isreg():
            for line in read(entry).decode("utf-8", "surrogateescape").splitlines():  # as tarfile decodes names
                listed = tree.resolve_parent(norm(line))
                found = tree.entries.get(listed)
                if found is None or found.info.isdir():
                    continue
                owners[listed] = min(owners.get(listed, source), source)  # shared: the first by name
    # What maintainer scripts generate: bytecode goes with its source file; a file in a directory
    # whose owned files all come from one source package goes with it (depmod's modules.* with the
    # kernel). Directories of many owners, and the top two levels (/etc, /usr/lib), keep theirs: `rest`.
    by_dir: dict[str, set[str]] = {}
    for path, source in owners.items():
        if not path.startswith(DPKG_INFO):
            by_dir.setdefault(path.rpartition("/")[0], set()).add(source)
    for path, entry in sorted(tree.entries.items()):
        if path in owners or entry.info.isdir():
            continue
        match = PYC.match(path)
        owner = owners.get(f"{match['dir']}/{match['stem']}.py") if match else None
        if owner is None:
            owner = generated.get(path)
        parent = path.rpartition("/")[0]
        if owner is None and parent.count("/") >= 2:  # not /, /etc, /usr/lib: shared by design
            dir_owners = by_dir.get(parent, set())
            owner = next(iter(dir_owners)) if len(dir_owners) == 1 else None
        if owner is not None:
            owners[path] = owner
    return owners


def bucket_of(source: str) -> int:
    return int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "big") % BUCKETS


def finalize_chunks(tree: Tree, owners: dict[str, str]) -> dict[str, list[str]]:
    """Chunk name -> the non-directory paths it holds; in layer order (own layers, buckets, rest)."""
    sizes: dict[str, int] = {}
    for path, source in owners.items():
        sizes[source] = sizes.get(source, 0) + tree.entries[path].info.size
    own = {s for s, n in sizes.items() if n >= OWN_LAYER_BYTES}
    chunks: dict[str, list[str]] = {f"pkg-{s}": [] for s in sorted(own)}
    chunks.update({f"bucket-{b:02d}": [] for b in range(BUCKETS)})
    chunks[REST] = []
    for path in sorted(tree.entries):
        entry = tree.entries[path]
        if entry.info.isdir():
            continue
        owner = owners.get(path)
        if owner is None:
            chunks[REST].append(path)
        elif owner in own:
            chunks[f"pkg-{owner}"].append(path)
        else:
            chunks[f"bucket-{bucket_of(owner):02d}"].append(path)
    # A hard link goes with the file it links to when both are in one layer; else it is written as a copy.
    return {name: paths for name, paths in chunks.items() if paths or name == REST}


# -- writing the layers -----------------------------------------------------------------


def _clean_info(info: tarfile.TarInfo, path: str, *, epoch: int | None = None) -> tarfile.TarInfo:
    out = copy.copy(info)
    out.name = path
    out.pax_headers = {k: v for k, v in info.pax_headers.items()
                       if k not in ("path", "linkpath", "mtime", "atime", "ctime", "size", "hdrcharset")}
    out.mtime = info.mtime if epoch is None else epoch
    return out


def write_chunk(out: IO[bytes], tree: Tree, paths: list[str], *, all_dirs: bool, epoch: int,
                opener: Any) -> None:
    """One layer tar: PATHS' parent directories (or every directory), then PATHS, sorted."""
    members = set(paths)
    dirs: set[str] = set()
    if all_dirs:
        dirs = {p for p, e in tree.entries.items() if e.info.isdir()}
    for path in paths:
        parent = path.rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(dirs | members):
            entry = tree.entries.get(path)
            if entry is None:
                raise BuildError(f"rechunking: {path} is a parent of a file but not in the merged tree")
            if entry.info.isdir():
                tar.addfile(_clean_info(entry.info, path, epoch=epoch))
            elif entry.data is None:
                info = _clean_info(entry.info, path)
                tar.addfile(info, opener(entry) if info.isreg() else None)
        # Where each linked file's bytes are in this layer: its own path (written above), or the first
        # link written as a copy (its file is in another layer, or no longer in the tree).
        written: dict[int, str] = {id(tree.entries[p]): p for p in members if tree.entries[p].data is None}
        for path in sorted(members):
            entry = tree.entries[path]
            if entry.data is None:
                continue
            source = entry.data
            first = written.get(id(source))
            if first is not None:
                info = _clean_info(entry.info, path)
                info.linkname = first
                tar.addfile(info)
            else:
                info = _clean_info(source.info, path)
                tar.addfile(info, opener(source) if info.isreg() else None)
                written[id(source)] = path


# -- docker-archive in and out -------------------------------------------------------------


@dataclass
class Archive:
    root: Path
    config: dict[str, Any]
    layers: list[Path]


def read_archive(root: Path) -> Archive:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        if not isinstance(manifest, list) or len(manifest) != 1:
            raise BuildError(f"rechunking: {root}/manifest.json does not list exactly one image")
        config = json.loads((root / manifest[0]["Config"]).read_text())
        return Archive(root, config, [root / p for p in manifest[0]["Layers"]])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise BuildError(f"rechunking: {root} is not a docker-archive of one image: {exc}") from exc


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Chunked:
    """What rechunking made: one (name, diff id, number of files) per layer, and each layer's source
    packages (build.json `osStage.layers`: which layer a package's update moves)."""

    layers: tuple[tuple[str, str, int], ...]
    sources: tuple[tuple[str, ...], ...] = ()

    def table(self) -> list[dict[str, Any]]:
        return [{"name": name, "diffId": diff_id, "files": files, "sources": list(sources)}
                for (name, diff_id, files), sources in zip(self.layers, self.sources, strict=True)]


def rechunk_archive(src: Archive, dest: Path, tag: str, epoch: int) -> Chunked:
    """Write DEST (an unpacked docker-archive, tagged TAG): SRC's files in rechunked layers."""
    tree = Tree()
    for index, layer in enumerate(src.layers):
        with tarfile.open(layer, "r:") as tar:
            tree.apply(index, iter(tar))
    handles: dict[int, IO[bytes]] = {}

    def opener(entry: Entry) -> _Limited:
        f = handles.get(entry.layer)
        if f is None:
            f = handles[entry.layer] = src.layers[entry.layer].open("rb")
        f.seek(entry.info.offset_data)
        return _Limited(f, entry.info.size)

    def read(entry: Entry) -> bytes:
        return opener(entry.data or entry).read()

    try:
        owners = finalize_owners(tree, read)
        chunks = finalize_chunks(tree, owners)
        dest.mkdir(parents=True)
        made: list[tuple[str, str, int]] = []
        sources: list[tuple[str, ...]] = []
        for name, paths in chunks.items():
            tmp = dest / f"{name}.tar"
            with tmp.open("wb") as out:
                write_chunk(out, tree, paths, all_dirs=name == REST, epoch=epoch, opener=opener)
            diff_id = _sha256_file(tmp)
            tmp.rename(dest / f"{diff_id.removeprefix('sha256:')}.tar")
            made.append((name, diff_id, len(paths)))
            sources.append(tuple(sorted({owners[p] for p in paths if p in owners})))
    finally:
        for f in handles.values():
            f.close()
    created = datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {k: v for k, v in src.config.items() if k not in ("rootfs", "history", "created")}
    config["created"] = created
    config["rootfs"] = {"type": "layers", "diff_ids": [d for _, d, _ in made]}
    config["history"] = [{"created": created, "created_by": f"kiln rechunk r{RECIPE}: {name} ({n} files)"}
                         for name, _, n in made]
    raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(raw).hexdigest() + ".json"
    (dest / config_name).write_bytes(raw)
    manifest = [{"Config": config_name, "RepoTags": [tag],
                 "Layers": [f"{d.removeprefix('sha256:')}.tar" for _, d, _ in made]}]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return Chunked(tuple(made), tuple(sources))


class _Limited:
    """SIZE bytes of F from where it is (tarfile's addfile reads exactly info.size)."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


# -- the engine ---------------------------------------------------------------------------


def chunked_ref(cls: str, stage_id: str) -> str:
    return f"localhost/kiln/{cls}/os-chunks:{stage_id.removeprefix('sha256:')[:16]}-r{RECIPE}"


def make_rechunked_os(engine: Engine, state: StateDir, cls: str, stage_id: str, epoch: int, *,
                      force: bool = False, say: Any = None) -> tuple[str, list[dict[str, Any]]]:
    """The rechunked image of the built OS stage STAGE_ID (made once per stage, again with FORCE): its
    ref, and its layers' table (Chunked.table, kept beside it in the state directory)."""
    ref = chunked_ref(cls, stage_id)
    table_file = state.root / "rechunk" / f"{ref.rpartition(':')[2]}.json"
    if not force and engine.exists(ref) and table_file.is_file():
        table: list[dict[str, Any]] = json.loads(table_file.read_text())
        if [layer["diff_id"] for layer in engine.inspect(ref)["layers"]] == [t["diffId"] for t in table]:
            return ref, table
    try:
        with tempfile.TemporaryDirectory(dir=state.tmp_dir, prefix="rechunk-") as tmp:
            result = _rechunk_in(Path(tmp), engine, stage_id, ref, epoch)
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:  # a full disk, a damaged archive
        raise BuildError(f"rechunking the OS stage {stage_id.removeprefix('sha256:')[:12]}: {exc}") from exc
    table = result.table()
    table_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(table_file, table)
    if say is not None:
        say(f"rechunked the OS stage into {len(result.layers)} layers: "
            + ", ".join(name for name, _, _ in result.layers))
    return ref, table


def _rechunk_in(tmp: Path, engine: Engine, stage_id: str, ref: str, epoch: int) -> Chunked:
    """Save, rechunk and load, in TMP; at most about twice the stage's size on disk at a time."""
    saved, src_dir, out_dir, archive = tmp / "stage.tar", tmp / "stage", tmp / "chunked", tmp / "chunked.tar"
    engine.save(stage_id, saved)
    src_dir.mkdir()
    with tarfile.open(saved, "r:") as tar:
        tar.extractall(src_dir, filter="data")
    saved.unlink()
    result = rechunk_archive(read_archive(src_dir), out_dir, ref, epoch)
    shutil.rmtree(src_dir)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for item in sorted(out_dir.iterdir()):
            tar.add(item, arcname=item.name)
            item.unlink()
    engine.load(archive)
    return result
