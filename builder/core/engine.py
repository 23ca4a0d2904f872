"""OCI engines behind one small interface: podman CLI (default) and the docker SDK.

    engine = select_engine("auto", state)      # checks the version up front
    image_id = engine.build(ctx, ctx / "Containerfile", "localhost/kiln/x:1", {}, 1735689600)
    info = engine.inspect(image_id)            # id, digest, labels, layers with sizes
    digest = engine.push(image_id, "127.0.0.1:5000/kiln/x:1", tls_verify=False)

`auto` picks docker when `DOCKER_HOST` is set, podman otherwise. Only the podman
engine builds reproducibly (`--timestamp`); the Docker API has no equivalent
for the classic builder, so `Engine.reproducible` says which one you have.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from builder.core import output
from builder.core.errors import BuildError, CommandFailed, KilnError, RegistryError, ToolMissing, UsageError
from builder.core.run import find_tool, have_tool, run, run_streaming, spawn
from builder.core.state import StateDir

MIN_PODMAN = (4, 0)
MIN_DOCKER_API = (1, 41)
ENGINE_NAMES = ("auto", "podman", "docker")
# Transports that `podman push` takes as a destination besides a registry.
PUSH_TRANSPORTS = ("docker://", "oci:", "oci-archive:", "dir:", "docker-archive:")


class ImageLayer(TypedDict):
    diff_id: str  # sha256 of the uncompressed layer tar: stable across engines and pushes
    size: int | None  # uncompressed bytes, None where the engine does not say
    created_by: str


class ImageInfo(TypedDict):
    id: str  # "sha256:<config digest>"
    digest: str | None  # local manifest digest, when the engine knows one
    created: str
    architecture: str
    labels: dict[str, str]
    size: int
    layers: list[ImageLayer]


class Engine(ABC):
    """What Kiln needs from an OCI engine. Refs are names (`localhost/kiln/x:1`) or ids."""

    name: ClassVar[str]
    reproducible: ClassVar[bool]  # same inputs + timestamp give the same image id

    @abstractmethod
    def version(self) -> str:
        """Check the engine is usable and new enough; return its version or raise ToolMissing."""

    @abstractmethod
    def build(
        self,
        context_dir: Path,
        containerfile: Path,
        tag: str,
        build_args: Mapping[str, str] | None = None,
        timestamp: int | None = None,
        *,
        no_cache: bool = False,
        target: str | None = None,
        platform: str | None = None,
    ) -> str:
        """Build with live output; return the image id ("sha256:...").

        `timestamp` (seconds since the epoch) fixes every created time and file
        mtime in new layers; `no_cache` ignores cached layers (a cold build); `target` builds up to
        that stage only; `platform` (`linux/arm64`) builds for another architecture (its RUN steps
        run under qemu-user: builder.base.emulation).
        """

    @abstractmethod
    def inspect(self, ref: str) -> ImageInfo: ...

    @abstractmethod
    def exists(self, ref: str) -> bool: ...

    @abstractmethod
    def push(self, ref: str, dest: str, *, tls_verify: bool = True, authfile: Path | None = None,
             cert_dir: Path | None = None) -> str:
        """Push `ref` to `dest` (`host:port/repo:tag`); return the pushed manifest digest.

        `authfile` is a containers-auth.json for a registry with auth (builder.core.secrets: never
        credentials on a command line); `cert_dir` holds a `ca.crt` that signs the registry's
        certificate (podman only).
        """

    @abstractmethod
    def load(self, archive: Path) -> None:
        """Load a docker-archive tar (its RepoTags name the image)."""

    @abstractmethod
    def save(self, ref: str, archive: Path) -> None:
        """Write image REF as a docker-archive tar (uncompressed layers) to ARCHIVE."""

    @abstractmethod
    def remove(self, ref: str) -> None: ...

    @abstractmethod
    def read_file(self, ref: str, path: str) -> bytes:
        """The bytes of one regular file of image REF (a container is made, never started, and removed)."""


def needs_version(found: str, minimum: tuple[int, ...]) -> bool:
    """True when version string `found` ("4.3.1", "1.41") is older than `minimum`."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", found)[: len(minimum)])
    return numbers < minimum


def finalize_layers(
    history: Sequence[Mapping[str, Any]], diff_ids: Sequence[str], sizes: Sequence[int] | None
) -> list[ImageLayer]:
    """Pair the config's non-empty history entries with the layer diff ids (and sizes)."""
    real = [h for h in history if not h.get("empty_layer")]
    if len(real) != len(diff_ids):
        real = [{} for _ in diff_ids]
    usable = sizes if sizes is not None and len(sizes) == len(diff_ids) else None
    return [
        ImageLayer(
            diff_id=diff_id,
            size=usable[i] if usable is not None else None,
            created_by=str(real[i].get("created_by", "")),
        )
        for i, diff_id in enumerate(diff_ids)
    ]


def finalize_image_id(raw: str) -> str:
    raw = raw.strip()
    return raw if raw.startswith("sha256:") else f"sha256:{raw}"


def finalize_push_dest(dest: str) -> str:
    return dest if dest.startswith(PUSH_TRANSPORTS) else f"docker://{dest}"


class PodmanEngine(Engine):
    """podman CLI against Kiln's private store (containers.conf with runc, see state.py)."""

    name = "podman"
    reproducible = True

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.env = state.engine_env()

    def _podman(self, *args: str | os.PathLike[str], **kwargs: Any) -> Any:
        return run(["podman", *args], env=self.env, **kwargs)

    def version(self) -> str:
        out = self._podman("--version", capture=True, quiet=True).stdout.decode()
        found = out.split()[-1]
        if needs_version(found, MIN_PODMAN):
            need = ".".join(map(str, MIN_PODMAN))
            raise ToolMissing(
                f"podman {found} is too old; Kiln needs podman >= {need}",
                hint="apt-get install podman runc (Debian 12 ships 4.3)",
            )
        if not have_tool("runc"):
            raise ToolMissing(
                "runc not found; Kiln's containers.conf runs builds with runc "
                "(crun fails on cgroups v1/hybrid hosts); install it with: apt-get install runc"
            )
        return found

    def build(
        self,
        context_dir: Path,
        containerfile: Path,
        tag: str,
        build_args: Mapping[str, str] | None = None,
        timestamp: int | None = None,
        *,
        no_cache: bool = False,
        target: str | None = None,
        platform: str | None = None,
    ) -> str:
        with tempfile.TemporaryDirectory(dir=self.state.tmp_dir) as tmp:
            iidfile = Path(tmp) / "iid"
            argv: list[str | os.PathLike[str]] = [
                "podman", "build", "--layers",
                "--network", "host",
                "--file", containerfile,
                "--tag", tag,
                "--iidfile", iidfile,
            ]  # fmt: skip
            if timestamp is not None:
                argv += ["--timestamp", str(timestamp)]
            if no_cache:
                argv.append("--no-cache")
            if target:
                argv += ["--target", target]
            if platform:
                argv += ["--platform", platform]
            for key, value in (build_args or {}).items():
                argv += ["--build-arg", f"{key}={value}"]
            argv.append(context_dir)
            try:
                run_streaming(argv, env=self.env)
            except CommandFailed as exc:
                raise BuildError(f"building {tag}: {exc}") from exc
            return finalize_image_id(iidfile.read_text())

    def inspect(self, ref: str) -> ImageInfo:
        out = self._podman("image", "inspect", "--format", "json", ref, capture=True, quiet=True)
        data = _loads(out.stdout)[0]
        hist = _loads(self._podman("history", "--format", "json", "--no-trunc", ref, capture=True, quiet=True).stdout)
        history = data.get("History") or []
        # `podman history` lists every config history entry, newest first, with sizes.
        sizes = None
        if len(hist) == len(history):
            pairs = zip(history, reversed(hist), strict=True)
            sizes = [int(h["size"]) for c, h in pairs if not c.get("empty_layer")]
        return ImageInfo(
            id=finalize_image_id(data["Id"]),
            digest=data.get("Digest"),
            created=data.get("Created", ""),
            architecture=data.get("Architecture", ""),
            labels=dict(data.get("Labels") or {}),
            size=int(data.get("Size", 0)),
            layers=finalize_layers(history, data["RootFS"]["Layers"], sizes),
        )

    def exists(self, ref: str) -> bool:
        proc = self._podman("image", "exists", ref, check=False, capture=True, quiet=True)
        return bool(proc.returncode == 0)

    def push(self, ref: str, dest: str, *, tls_verify: bool = True, authfile: Path | None = None,
             cert_dir: Path | None = None) -> str:
        with tempfile.TemporaryDirectory(dir=self.state.tmp_dir) as tmp:
            digestfile = Path(tmp) / "digest"
            argv: list[str | os.PathLike[str]] = [
                "podman", "push",
                "--digestfile", digestfile,
                f"--tls-verify={'true' if tls_verify else 'false'}",
                # gzip, whatever a containers.conf or a newer podman's default says (zstd, zstd:chunked): the
                # agent reads gzip layers only (kiln_device.layers), and would blocklist the release
                "--compression-format", "gzip",
            ]  # fmt: skip
            if authfile:
                argv += ["--authfile", authfile]
            if cert_dir:
                argv += ["--cert-dir", cert_dir]
            argv += [ref, finalize_push_dest(dest)]
            try:
                run_streaming(argv, env=self.env)
            except CommandFailed as exc:
                raise RegistryError(f"pushing {ref} to {dest}: {exc}") from exc
            return digestfile.read_text().strip()

    def load(self, archive: Path) -> None:
        self._podman("load", "--input", archive)

    def save(self, ref: str, archive: Path) -> None:
        self._podman("save", "--format", "docker-archive", "--output", archive, ref, capture=True, quiet=True)

    def remove(self, ref: str) -> None:
        self._podman("rmi", "--force", ref, capture=True)

    def read_file(self, ref: str, path: str) -> bytes:
        cid = self._podman("create", "--quiet", ref, "/bin/true", capture=True, quiet=True).stdout.decode().strip()
        try:
            out = self._podman("cp", f"{cid}:{path}", "-", capture=True, quiet=True).stdout
        finally:
            self._podman("rm", "--force", cid, capture=True, quiet=True, check=False)
        return _one_file(out, path)


class DockerEngine(Engine):
    """The docker SDK for Python against a Docker API socket (Docker, or a podman service)."""

    name = "docker"
    reproducible = False  # the Docker API has no --timestamp for the classic builder

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import docker  # type: ignore[import-untyped]
            except ImportError as exc:
                raise ToolMissing(
                    "the docker Python package is not installed; install it with: pip install docker"
                ) from exc
            self._client = docker.DockerClient(base_url=self.base_url, timeout=600)
        return self._client

    def _errors(self) -> Any:
        import docker.errors

        return docker.errors

    def version(self) -> str:
        try:
            info = self.client.version()
        except self._errors().DockerException as exc:
            raise ToolMissing(
                f"no Docker API at {self.base_url}: {exc}",
                hint="start Docker, or `podman system service --time 0 unix:///PATH` and set DOCKER_HOST=unix:///PATH",
            ) from exc
        api = str(info.get("ApiVersion", "0"))
        if needs_version(api, MIN_DOCKER_API):
            need = ".".join(map(str, MIN_DOCKER_API))
            raise ToolMissing(f"Docker API {api} at {self.base_url} is too old; Kiln needs >= {need}")
        return f"{info.get('Version', '?')} (API {api})"

    def build(
        self,
        context_dir: Path,
        containerfile: Path,
        tag: str,
        build_args: Mapping[str, str] | None = None,
        timestamp: int | None = None,
        *,
        no_cache: bool = False,
        target: str | None = None,
        platform: str | None = None,
    ) -> str:
        # The Docker API has no equivalent of --timestamp: `timestamp` is ignored here
        # (see `reproducible`); passing SOURCE_DATE_EPOCH would only warn "not consumed".
        args = dict(build_args or {})
        dockerfile = _relative_or_absolute(containerfile, context_dir)
        output.detail(f"+ docker-sdk build --tag {tag} --file {dockerfile} {context_dir}")
        try:
            stream = self.client.api.build(
                path=str(context_dir),
                dockerfile=dockerfile,
                tag=tag,
                buildargs=args,
                network_mode="host",
                nocache=no_cache,
                target=target,
                platform=platform,
                rm=True,
                forcerm=True,
                decode=True,
            )
            for chunk in stream:
                _show_chunk(chunk, "building", tag)
        except self._errors().APIError as exc:
            raise BuildError(f"building {tag}: {exc}") from exc
        return self.inspect(tag)["id"]

    def inspect(self, ref: str) -> ImageInfo:
        try:
            data = self.client.api.inspect_image(ref)
            hist = self.client.api.history(ref)
        except self._errors().ImageNotFound as exc:
            raise BuildError(f"image {ref} not found") from exc
        diff_ids = list(data["RootFS"]["Layers"])
        # The Docker API history has no empty_layer flag; layers are the entries with bytes.
        sized = [h for h in reversed(hist) if int(h.get("Size", 0)) > 0]
        history = [{"created_by": h.get("CreatedBy", "")} for h in sized]
        digests = data.get("RepoDigests") or []
        return ImageInfo(
            id=finalize_image_id(data["Id"]),
            digest=digests[0].split("@", 1)[1] if digests else None,
            created=str(data.get("Created", "")),
            architecture=data.get("Architecture", ""),
            labels=dict((data.get("Config") or {}).get("Labels") or {}),
            size=int(data.get("Size", 0)),
            layers=finalize_layers(history, diff_ids, [int(h["Size"]) for h in sized]),
        )

    def exists(self, ref: str) -> bool:
        try:
            self.client.api.inspect_image(ref)
        except self._errors().ImageNotFound:
            return False
        return True

    def push(self, ref: str, dest: str, *, tls_verify: bool = True, authfile: Path | None = None,
             cert_dir: Path | None = None) -> str:
        from builder.core.secrets import credentials_from_auth_file

        if cert_dir is not None:
            raise UsageError("--cert-dir works with the podman engine only; with Docker, install the CA "
                             "under /etc/docker/certs.d/<registry>/")
        repo, _, tag = dest.rpartition(":")
        if not repo or "/" in tag:
            repo, tag = dest, "latest"
        output.detail(f"+ docker-sdk push {ref} {repo}:{tag}")
        digest = None
        try:
            self.client.api.tag(ref, repo, tag)
            creds = credentials_from_auth_file(authfile, dest) if authfile else None
            for chunk in self._push_stream(repo, tag, tls_verify, creds):
                _show_chunk(chunk, "pushing", ref, error=RegistryError)
                aux = chunk.get("aux") or {}
                digest = aux.get("Digest", digest)
                found = re.search(r"digest: (sha256:[0-9a-f]{64})", str(chunk.get("status", "")))
                digest = found.group(1) if found else digest
        except self._errors().APIError as exc:
            raise RegistryError(f"pushing {ref} to {dest}: {exc}") from exc
        if digest is None:
            raise RegistryError(f"pushing {ref} to {dest}: the engine reported no digest")
        return str(digest)

    def _push_stream(self, repo: str, tag: str, tls_verify: bool, creds: Any) -> Iterator[dict[str, Any]]:
        api = self.client.api
        auth_config = {"username": creds.user, "password": creds.password} if creds else None
        if tls_verify:
            return iter(api.push(repo, tag, stream=True, decode=True, auth_config=auth_config))
        # docker-py cannot pass podman's `tlsVerify=false` (needed for a plain-http
        # registry behind a podman service; Docker ignores the parameter and already
        # treats 127.0.0.0/8 as insecure), so send the same request with it added.
        from docker import auth

        header = auth.encode_header(auth_config) if auth_config else \
            auth.get_config_header(api, auth.resolve_repository_name(repo)[0])
        response = api._post_json(
            api._url("/images/{0}/push", repo),
            None,
            headers={"X-Registry-Auth": header} if header else {},
            params={"tag": tag, "tlsVerify": "false"},
            stream=True,
        )
        api._raise_for_status(response)
        return iter(api._stream_helper(response, decode=True))

    def load(self, archive: Path) -> None:
        output.detail(f"+ docker-sdk load {archive}")
        with archive.open("rb") as data:
            for chunk in self.client.api.load_image(data):
                _show_chunk(chunk, "loading", str(archive))

    def save(self, ref: str, archive: Path) -> None:
        output.detail(f"+ docker-sdk save {ref} {archive}")
        with archive.open("wb") as out:
            for chunk in self.client.images.get(ref).save(named=True):
                out.write(chunk)

    def remove(self, ref: str) -> None:
        try:
            self.client.api.remove_image(ref, force=True)
        except self._errors().ImageNotFound:
            pass

    def read_file(self, ref: str, path: str) -> bytes:
        api = self.client.api
        cid = api.create_container(ref, command=["/bin/true"])["Id"]
        try:
            stream, _ = api.get_archive(cid, path)
            out = b"".join(stream)
        finally:
            api.remove_container(cid, force=True)
        return _one_file(out, path)


def _one_file(tar_bytes: bytes, path: str) -> bytes:
    """The one regular file in a tar stream (`podman cp ... -`, the Docker archive API)."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            if member.isfile():
                fh = tar.extractfile(member)
                assert fh is not None
                return fh.read()
    raise BuildError(f"{path}: not a regular file in the image")


def _loads(raw: bytes) -> Any:
    return json.loads(raw)


def _relative_or_absolute(path: Path, base: Path) -> str:
    try:
        return str(path.absolute().relative_to(base.absolute()))
    except ValueError:
        return str(path.absolute())


def _show_chunk(chunk: Mapping[str, Any], doing: str, what: str, error: type[KilnError] = BuildError) -> None:
    """Print one decoded Docker API progress message; raise on an error message."""
    if "error" in chunk or "errorDetail" in chunk:
        detail = chunk.get("error") or (chunk.get("errorDetail") or {}).get("message")
        raise error(f"{doing} {what}: {str(detail).strip()}")
    text = chunk.get("stream") or chunk.get("status")
    if text:
        for line in str(text).rstrip("\n").splitlines():
            output.detail(f"  {line}")


def select_engine(name: str, state: StateDir, *, check: bool = True) -> Engine:
    """`auto`: docker when DOCKER_HOST is set, else podman. Checks the version unless told not to."""
    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown engine {name!r}; expected one of {', '.join(ENGINE_NAMES)}")
    if name == "auto":
        name = "docker" if os.environ.get("DOCKER_HOST") else "podman"
    engine: Engine = DockerEngine() if name == "docker" else PodmanEngine(state)
    if check:
        engine.version()
    return engine


@contextmanager
def start_podman_service(state: StateDir, sock: Path, *, timeout: float = 30.0) -> Iterator[str]:
    """Run `podman system service` on a unix socket over Kiln's store; yield its DOCKER_HOST URL.

    The service speaks the Docker API (1.41), so DockerEngine(url) builds into
    the same private store as PodmanEngine(state). Always stopped on exit.
    """
    find_tool("podman")
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    url = f"unix://{sock}"
    log = sock.with_suffix(".log")
    proc = spawn(["podman", "system", "service", "--time", "0", url], env=state.engine_env(), log=log)
    try:
        _wait_for_socket(sock, proc.poll, timeout, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)


def _wait_for_socket(sock: Path, poll: Any, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise CommandFailed(["podman", "system", "service"], int(poll()), tail)
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as conn:
                try:
                    conn.connect(str(sock))
                    return
                except OSError:
                    pass
        time.sleep(0.1)
    raise BuildError(f"podman system service did not listen on {sock} within {timeout:.0f} s")
