"""builder.image.rechunk on small OS stages made here: the rechunked layers stack to the same tree, each
package lands in one layer, the same stage gives the same bytes, and a package update moves only its
layer and `rest`. The real OS stage is checked in tests/container/test_build.py."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from builder.core.errors import BuildError
from builder.image import rechunk

EPOCH = 1735689600


def status(*packages: tuple[str, str, str]) -> bytes:
    """dpkg's status file for (package, source, version)."""
    stanzas = []
    for name, source, ver in packages:
        src = f"Source: {source}\n" if source != name else ""
        stanzas.append(f"Package: {name}\nStatus: install ok installed\n{src}Version: {ver}\nArchitecture: amd64\n")
    stanzas.append("Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n")
    return "\n".join(stanzas).encode()


class Layer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by save

    def dir(self, name: str, mode: int = 0o755, mtime: int = 1000) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, mtime
        self.tar.addfile(info)
        return self

    def file(self, name: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
             xattrs: dict[str, str] | None = None) -> Layer:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, 500
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
        self.tar.addfile(info, io.BytesIO(data))
        return self

    def link(self, name: str, target: str, *, hard: bool = False) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
        self.tar.addfile(info)
        return self

    def save(self, path: Path) -> Path:
        self.tar.close()
        path.write_bytes(self.buf.getvalue())
        return path


def base_layer(libc: bytes = b"libc 2.36-9") -> Layer:
    layer = Layer()
    for d in ("usr", "usr/bin", "usr/lib", "usr/lib/python3", "etc", "var", "var/lib", "var/lib/dpkg",
              "var/lib/dpkg/info", "var/cache", "var/cache/apt"):
        layer.dir(d)
    layer.link("bin", "usr/bin").link("lib", "usr/lib")
    layer.file("usr/bin/ls", b"ls binary" * 100, mode=0o755)
    layer.file("usr/bin/ping", b"ping", mode=0o755, xattrs={"security.capability": "\x01\x00\x00\x02 \x00"})
    layer.file("usr/bin/chage", b"chage", mode=0o2755, gid=42)
    layer.file("usr/bin/perl5.36", b"perl" * 300, mode=0o755).link("usr/bin/perl", "usr/bin/perl5.36", hard=True)
    layer.file("usr/lib/libc.so.6", libc)
    layer.file("usr/lib/libperl.so.5.36", b"libperl" * 50)
    layer.file("usr/lib/python3/x.py", b"print(1)\n")
    layer.dir("usr/lib/python3/__pycache__").file("usr/lib/python3/__pycache__/x.cpython-311.pyc", b"pyc")
    layer.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    layer.file("var/cache/apt/pkgcache.bin", b"cache")
    layer.file("usr/bin/old-tool", b"removed by the next layer")
    lists = {
        "coreutils": "/.\n/bin\n/bin/ls\n",  # merged /usr: dpkg lists /bin/ls, the file is usr/bin/ls
        "passwd": "/usr/bin/chage\n/usr/bin/old-tool\n",
        "iputils-ping": "/usr/bin/ping\n",
        "perl-base": "/usr/bin/perl\n/usr/bin/perl5.36\n",
        "libperl5.36:amd64": "/usr/lib/libperl.so.5.36\n",  # dots in the name (libperl5.36, python3.11)
        "libc6:amd64": "/lib/libc.so.6\n",
        "python3-x": "/usr/lib/python3/x.py\n",
    }
    for pkg, listed in lists.items():
        layer.file(f"var/lib/dpkg/info/{pkg}.list", listed.encode())
    layer.file("var/lib/dpkg/info/libc6:amd64.postinst", b"#!/bin/sh\n", mode=0o755)
    layer.file("var/lib/dpkg/status", status(("coreutils", "coreutils", "9.1"), ("passwd", "shadow", "4.13"),
                                             ("iputils-ping", "iputils", "3"), ("perl-base", "perl", "5.36"),
                                             ("libperl5.36", "perl", "5.36"), ("libc6", "glibc", libc.decode()),
                                             ("python3-x", "python3-x", "1")))
    return layer


def os_layer(jq: bytes = b"jq 1.6", libc: bytes = b"libc 2.36-9") -> Layer:
    layer = Layer()
    layer.file("usr/bin/.wh.old-tool", b"")
    layer.file("var/cache/apt/.wh..wh..opq", b"")
    layer.file("usr/bin/jq", jq, mode=0o755)
    layer.file("var/lib/dpkg/info/jq.list", b"/usr/bin/jq\n")
    layer.file("var/lib/dpkg/status", status(("coreutils", "coreutils", "9.1"), ("passwd", "shadow", "4.13"),
                                             ("iputils-ping", "iputils", "3"), ("perl-base", "perl", "5.36"),
                                             ("libperl5.36", "perl", "5.36"), ("libc6", "glibc", libc.decode()),
                                             ("python3-x", "python3-x", "1"), ("jq", "jq", jq.decode())))
    return layer


def make_stage(tmp: Path, *layers: Layer, name: str = "stage") -> rechunk.Archive:
    root = tmp / name
    root.mkdir()
    config = {"architecture": "amd64", "os": "linux", "config": {"Env": ["DEBIAN_FRONTEND=noninteractive"]},
              "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
    return rechunk.Archive(root, config, [layer.save(root / f"{i}.tar") for i, layer in enumerate(layers)])


def merged(archive_dir: Path) -> tuple[rechunk.Tree, list[Path]]:
    manifest = json.loads((archive_dir / "manifest.json").read_text())[0]
    layers = [archive_dir / p for p in manifest["Layers"]]
    tree = rechunk.Tree()
    for i, path in enumerate(layers):
        with tarfile.open(path, "r:") as tar:
            tree.apply(i, iter(tar))
    return tree, layers


def describe(tree: rechunk.Tree, layers: list[Path]) -> dict[str, tuple[Any, ...]]:
    """Every path's type, mode, owner, link target, xattrs and content digest (directories: no time)."""
    out = {}
    for path, entry in tree.entries.items():
        info = entry.info
        data = b""
        source = entry.data or entry
        if source.info.isreg():
            with layers[source.layer].open("rb") as f:
                f.seek(source.info.offset_data)
                data = f.read(source.info.size)
        xattrs = {k: v for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        link = info.linkname if info.issym() else ""
        kind = tarfile.REGTYPE if info.islnk() else info.type
        # the permission bits: Go's archive/tar (podman) also writes the file type's, tarfile does not
        mode = (source.info if info.islnk() else info).mode & 0o7777
        out[path] = (kind, mode, info.uid, info.gid, link,
                     sorted(xattrs.items()), hashlib.sha256(data).hexdigest())
    return out


def layer_of(tmp_out: Path, made: rechunk.Chunked) -> dict[str, str]:
    """path -> the chunk holding it (non-directories)."""
    where = {}
    for name, diff_id, _ in made.layers:
        with tarfile.open(tmp_out / f"{diff_id.removeprefix('sha256:')}.tar", "r:") as tar:
            for info in tar:
                if not info.isdir():
                    where[info.name] = name
    return where


@pytest.fixture
def small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rechunk, "OWN_LAYER_BYTES", 1000)  # perl (2.2 KB here) gets a layer of its own


def test_rechunked_layers_stack_to_the_same_tree(tmp_path: Path, small_buckets: None) -> None:
    stage = make_stage(tmp_path, base_layer(), os_layer())
    made = rechunk.rechunk_archive(stage, tmp_path / "out", "localhost/x/os-chunks:t", EPOCH)
    before = rechunk.Tree()
    for i, path in enumerate(stage.layers):
        with tarfile.open(path, "r:") as tar:
            before.apply(i, iter(tar))
    after, layers = merged(tmp_path / "out")
    assert describe(after, layers) == describe(before, stage.layers)
    assert "usr/bin/old-tool" not in after.entries and "var/cache/apt/pkgcache.bin" not in after.entries
    assert after.entries["var/lib/dpkg/status"].info.size == before.entries["var/lib/dpkg/status"].info.size
    # the hard link stays one within its layer, and every directory carries the build's epoch
    assert after.entries["usr/bin/perl"].info.islnk()
    assert {e.info.mtime for e in after.entries.values() if e.info.isdir()} == {EPOCH}
    config = json.loads((tmp_path / "out" / json.loads((tmp_path / "out/manifest.json").read_text())[0]["Config"])
                        .read_text())
    assert config["rootfs"]["diff_ids"] == [d for _, d, _ in made.layers]
    assert config["config"]["Env"] == ["DEBIAN_FRONTEND=noninteractive"]
    assert [h["created_by"].split(":")[1].split(" (")[0].strip() for h in config["history"]] == \
        [name for name, _, _ in made.layers]


def test_each_package_lands_in_one_layer_by_its_source(tmp_path: Path, small_buckets: None) -> None:
    stage = make_stage(tmp_path, base_layer(), os_layer())
    made = rechunk.rechunk_archive(stage, tmp_path / "out", "localhost/x/os-chunks:t", EPOCH)
    where = layer_of(tmp_path / "out", made)
    sources = ("coreutils", "glibc", "shadow", "python3-x", "jq")
    bucket = {src: f"bucket-{rechunk.bucket_of(src):02d}" for src in sources}
    assert where["usr/bin/ls"] == bucket["coreutils"]  # listed as /bin/ls
    assert where["usr/lib/libc.so.6"] == bucket["glibc"]  # listed as /lib/libc.so.6 by libc6:amd64
    assert where["var/lib/dpkg/info/libc6:amd64.postinst"] == bucket["glibc"]
    assert where["usr/bin/chage"] == bucket["shadow"]  # binary package passwd, source shadow
    # perl-base and libperl5.36 (a dotted name): one source, large enough for a layer of its own
    assert where["usr/bin/perl5.36"] == where["usr/bin/perl"] == where["usr/lib/libperl.so.5.36"] == "pkg-perl"
    assert where["usr/lib/python3/__pycache__/x.cpython-311.pyc"] == bucket["python3-x"]  # with its .py
    assert where["usr/bin/jq"] == bucket["jq"]
    assert where["bin"] == bucket["coreutils"]  # a symbolic link dpkg lists goes with its package
    for unowned in ("etc/passwd", "var/lib/dpkg/status", "lib"):
        assert where[unowned] == rechunk.REST
    names = [name for name, _, _ in made.layers]
    assert names[0] == "pkg-perl" and names[-1] == rechunk.REST and names[1:-1] == sorted(names[1:-1])


def test_the_same_stage_gives_the_same_layers(tmp_path: Path) -> None:
    one = rechunk.rechunk_archive(make_stage(tmp_path, base_layer(), os_layer(), name="a"), tmp_path / "1",
                                  "localhost/x/os-chunks:t", EPOCH)
    two = rechunk.rechunk_archive(make_stage(tmp_path, base_layer(), os_layer(), name="b"), tmp_path / "2",
                                  "localhost/x/os-chunks:t", EPOCH)
    assert one == two
    assert (tmp_path / "1/manifest.json").read_bytes() == (tmp_path / "2/manifest.json").read_bytes()


def test_a_package_update_moves_its_layer_and_rest_only(tmp_path: Path) -> None:
    v1 = rechunk.rechunk_archive(make_stage(tmp_path, base_layer(), os_layer(), name="a"), tmp_path / "1",
                                 "localhost/x/os-chunks:t", EPOCH)
    # libc6 updated in the base: before rechunking, both layers changed (the base, and the OS layer's
    # copy of dpkg's status)
    v2 = rechunk.rechunk_archive(make_stage(tmp_path, base_layer(libc=b"libc 2.36-9+deb12u1"),
                                            os_layer(libc=b"libc 2.36-9+deb12u1"), name="b"),
                                 tmp_path / "2", "localhost/x/os-chunks:t", EPOCH)
    changed = {name for (name, d1, _), (_, d2, _) in zip(v1.layers, v2.layers, strict=True) if d1 != d2}
    assert changed == {f"bucket-{rechunk.bucket_of('glibc'):02d}", rechunk.REST}


def test_a_stage_without_dpkg_is_refused(tmp_path: Path) -> None:
    stage = make_stage(tmp_path, Layer().dir("usr").file("usr/x", b"x"))
    with pytest.raises(BuildError, match="no /var/lib/dpkg/status"):
        rechunk.rechunk_archive(stage, tmp_path / "out", "localhost/x/os-chunks:t", EPOCH)


def test_a_hard_link_to_nothing_is_refused(tmp_path: Path) -> None:
    stage = make_stage(tmp_path, Layer().link("usr/x", "usr/missing", hard=True))
    with pytest.raises(BuildError, match="hard link usr/x -> usr/missing: no such file"):
        rechunk.rechunk_archive(stage, tmp_path / "out", "localhost/x/os-chunks:t", EPOCH)


def test_hard_links_within_a_layer_stay_links_and_across_become_copies(tmp_path: Path) -> None:
    """A link to a symbolic link is kept (containers/storage writes one for any multiply linked
    non-directory); links whose file was removed become one copy and links to it, not one copy each."""
    base = base_layer()
    base.link("usr/bin/sh-link", "usr/bin/perl", hard=False).link("usr/bin/sh-link2", "usr/bin/sh-link", hard=True)
    base.file("usr/lib/python3/gone.bin", b"gone" * 100)
    base.link("usr/lib/python3/a.bin", "usr/lib/python3/gone.bin", hard=True)
    base.link("usr/lib/python3/b.bin", "usr/lib/python3/gone.bin", hard=True)
    top = os_layer()
    top.file("usr/lib/python3/.wh.gone.bin", b"")
    stage = make_stage(tmp_path, base, top)
    rechunk.rechunk_archive(stage, tmp_path / "out", "localhost/x/os-chunks:t", EPOCH)
    after, layers = merged(tmp_path / "out")
    before = rechunk.Tree()
    for i, path in enumerate(stage.layers):
        with tarfile.open(path, "r:") as tar:
            before.apply(i, iter(tar))
    assert describe(after, layers) == describe(before, stage.layers)
    assert "usr/lib/python3/gone.bin" not in after.entries
    a, b = after.entries["usr/lib/python3/a.bin"], after.entries["usr/lib/python3/b.bin"]
    assert a.info.isreg() and b.info.islnk() and b.info.linkname == "usr/lib/python3/a.bin"
    assert after.entries["usr/bin/sh-link2"].info.islnk()


def test_a_sparse_file_is_refused_with_its_place(tmp_path: Path) -> None:
    layer = Layer()
    info = tarfile.TarInfo("usr/sparse.img")
    info.type = tarfile.GNUTYPE_SPARSE
    layer.tar.addfile(info)
    with pytest.raises(BuildError, match=r"layer 0: usr/sparse\.img is a sparse file"):
        rechunk.rechunk_archive(make_stage(tmp_path, layer), tmp_path / "out", "x", EPOCH)


def test_a_damaged_archive_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"not": "a list"}')
    with pytest.raises(BuildError, match=r"manifest\.json does not list exactly one image"):
        rechunk.read_archive(tmp_path)
    (tmp_path / "manifest.json").write_text('[{"Layers": []}]')
    with pytest.raises(BuildError, match="is not a docker-archive of one image: 'Config'"):
        rechunk.read_archive(tmp_path)
