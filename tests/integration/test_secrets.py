"""Secrets stay secret: registry credentials become an auth file (never a command-line flag), echoed commands and
failures are redacted, the release key takes a passphrase (its TUF keys too), a key directory others can read is
refused, and a production class refuses a development key. Real gpg and real key files; the container tier pushes
to a registry with a password (tests/container/test_build.py)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.core import secrets
from builder.core.errors import CommandFailed, UsageError
from builder.core.run import format_argv, run
from builder.keys.release_key import make_signing_key, read_signing_key, resolve_signing_key
from builder.keys.signer import load_signer
from builder.keys.tuf_keys import TUF_DIR
from builder.spec.loader import load_class
from tests.conftest import require_tool

pytestmark = pytest.mark.integration


def test_echoed_commands_and_failures_never_show_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    secrets.register("hunter2-very-secret")
    shown = format_argv(["skopeo", "copy", "--src-creds=kiln:hunter2-very-secret", "--dest-creds", "u:p4ss",
                         "--passphrase", "xyzzy", "mkdir", "-p", "/tmp/x"])
    assert "hunter2" not in shown and "p4ss" not in shown and "xyzzy" not in shown
    assert "--src-creds=***" in shown and "--dest-creds '***'" in shown and "-p /tmp/x" in shown
    with pytest.raises(CommandFailed) as failed:
        run(["sh", "-c", "echo 'login kiln:hunter2-very-secret refused' >&2; exit 3", "hunter2-very-secret"])
    assert "hunter2" not in str(failed.value) and "***" in str(failed.value)
    assert "hunter2" not in capsys.readouterr().err  # the `+ sh -c ...` echo


def test_credentials_become_a_private_auth_file_that_is_removed(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(secrets.CREDS_ENV, "kiln:s3cret-pw")
    creds = secrets.registry_credentials()
    assert isinstance(creds, secrets.Credentials) and "s3cret" not in repr(creds)
    with secrets.auth_file("127.0.0.1:5443/kiln/qemu-x86_64:1.0.0", creds, tmp_path) as path:
        assert path is not None and path.stat().st_mode & 0o777 == 0o600
        auth = json.loads(path.read_text())["auths"]["127.0.0.1:5443"]["auth"]
        assert base64.b64decode(auth) == b"kiln:s3cret-pw"
        assert secrets.credentials_from_auth_file(path, "127.0.0.1:5443") == creds
    assert not path.exists()
    monkeypatch.setenv(secrets.CREDS_ENV, "no-colon")
    with pytest.raises(UsageError, match="expected USER:PASSWORD"):
        secrets.registry_credentials()
    with pytest.raises(UsageError, match="needs --username"):
        secrets.registry_credentials(password_stdin=True)
    with pytest.raises(UsageError, match="no such file"):
        secrets.registry_credentials(authfile=tmp_path / "missing.json")
    r = CliRunner().invoke(main, ["push", "qemu-x86_64", "127.0.0.1:5000", "--creds", "kiln:pw"])
    assert r.exit_code == 2 and "No such option '--creds'" in r.output  # the flag that put passwords in `ps` is gone


def test_a_release_key_with_a_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("gpg")
    phrase = tmp_path / "phrase"
    phrase.write_text("correct horse battery\n")
    monkeypatch.setenv(secrets.PASSPHRASE_FILE_ENV, str(phrase))
    key = make_signing_key(tmp_path / "key")
    assert json.loads((key.directory / "key.json").read_text())["passphrase"] is True
    pem = key.directory / TUF_DIR / "targets.pem"
    assert pem.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    load_signer(pem)  # the passphrase from the file
    # gpg holds the key under the passphrase: a signature without it fails, with it succeeds.
    doc = tmp_path / "doc"
    doc.write_text("release\n")
    gpg = ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--detach-sign", "-o"]
    env = {**key.env()}
    bad = run([*gpg, str(tmp_path / "bad.sig"), str(doc)], env=env, input=b"wrong\n", check=False, capture=True)
    assert bad.returncode != 0
    good = run([*gpg, str(tmp_path / "good.sig"), str(doc)], env=env, input=b"correct horse battery\n", capture=True)
    assert good.returncode == 0 and (tmp_path / "good.sig").stat().st_size > 0
    run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture=True)
    monkeypatch.delenv(secrets.PASSPHRASE_FILE_ENV)
    with pytest.raises(UsageError, match="KILN_KEY_PASSPHRASE"):
        load_signer(pem)
    monkeypatch.setenv(secrets.PASSPHRASE_ENV, "not it")
    with pytest.raises(UsageError, match="is the passphrase right"):
        load_signer(pem)
    monkeypatch.delenv(secrets.PASSPHRASE_ENV)
    # Finding (issue 33, 17): without a passphrase `kiln keys init` only warned, and made the keys anyway.
    r = CliRunner().invoke(main, ["keys", "init", str(tmp_path / "plain")])
    assert r.exit_code == UsageError.exit_code and "no passphrase for the new keys" in r.output, r.output
    assert not (tmp_path / "plain").exists()
    r = CliRunner().invoke(main, ["keys", "init", str(tmp_path / "plain"), "--no-passphrase"])
    assert r.exit_code == 0 and "have no passphrase" in r.output, r.output


def test_a_key_directory_others_can_read_is_refused(tmp_path: Path) -> None:
    require_tool("gpg")
    key = make_signing_key(tmp_path / "key")
    read_signing_key(key.directory)
    for path, mode in ((key.directory, 0o750), (key.directory / TUF_DIR / "online.pem", 0o644),
                       (key.gnupghome, 0o755)):
        before = path.stat().st_mode & 0o777
        path.chmod(mode)
        try:
            with pytest.raises(UsageError, match="readable by group or others") as refused:
                read_signing_key(key.directory)
            assert str(path) in str(refused.value) and "chmod -R go=" in (refused.value.hint or "")
        finally:
            path.chmod(before)
    r = CliRunner().invoke(main, ["keys", "show", str(key.directory)])
    assert r.exit_code == 0, r.output


def test_a_production_class_refuses_the_development_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("gpg")
    dev = make_signing_key(tmp_path / "dev", development=True)
    real = make_signing_key(tmp_path / "release")
    production = load_class("factory-gateway-gpu")
    assert not production.spec.development
    with pytest.raises(UsageError, match="refuses the development key"):
        resolve_signing_key(production, dev.directory)
    monkeypatch.setenv("KILN_SIGNING_KEY", str(dev.directory))
    with pytest.raises(UsageError, match="refuses the development key"):
        resolve_signing_key(production, None)
    assert resolve_signing_key(production, real.directory).fingerprint == real.fingerprint
    assert resolve_signing_key(load_class("qemu-x86_64"), dev.directory).fingerprint == dev.fingerprint


def test_a_release_key_travels_to_ci_as_one_secret(tmp_path: Path) -> None:
    """`kiln keys export` -> a CI secret -> `kiln keys import` on the runner: the same key, owner-only modes."""
    require_tool("gpg")
    key = make_signing_key(tmp_path / "key")
    runner = CliRunner()
    exported = runner.invoke(main, ["keys", "export", str(key.directory)])
    assert exported.exit_code == 0, exported.output
    blob = exported.stdout.strip()
    imported = runner.invoke(main, ["keys", "import", str(tmp_path / "ci-key")], env={"KILN_RELEASE_KEY": blob})
    assert imported.exit_code == 0, imported.output
    copy = read_signing_key(tmp_path / "ci-key")
    assert copy.fingerprint == key.fingerprint and key.fingerprint in imported.output
    for path in [copy.directory, *copy.directory.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, path
    # Every key but the root (issue 33, finding 1: the CI secret held the root, so it could rotate every role).
    tuf, copied = key.directory / TUF_DIR, copy.directory / TUF_DIR
    assert (copied / "targets.pem").read_bytes() == (tuf / "targets.pem").read_bytes()
    assert (tuf / "root.pem").is_file() and not (copied / "root.pem").exists()
    doc = tmp_path / "doc"
    doc.write_text("release\n")
    signed = run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--detach-sign", "-o",
                  str(tmp_path / "doc.sig"), str(doc)], env=copy.env(), input=b"\n", capture=True)
    assert signed.returncode == 0  # the imported GNUPGHOME signs
    run(["gpgconf", "--kill", "gpg-agent"], env=copy.env(), check=False, capture=True)
    again = runner.invoke(main, ["keys", "import", str(tmp_path / "ci-key")], env={"KILN_RELEASE_KEY": blob})
    assert again.exit_code == 2 and "exists" in again.output
    bad = runner.invoke(main, ["keys", "import", str(tmp_path / "other")], env={"KILN_RELEASE_KEY": "bm90IGEga2V5"})
    assert bad.exit_code == 2 and "not a key from `kiln keys export`" in bad.output


def test_secret_files_a_killed_kiln_left_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An auth file of a process that is gone (a SIGKILL in mid-push) is removed the next time; a live one stays."""
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"auth-{gone.pid}-x.json"
    stale.write_text('{"auths": {}}')
    live = tmp_path / f"auth-{os.getpid()}-y.json"
    live.write_text('{"auths": {}}')
    old = tmp_path / "passphrase-abc"
    old.write_text("from before the pid was in the name\n")
    monkeypatch.setenv(secrets.CREDS_ENV, "kiln:pw-sweep")
    with secrets.auth_file("127.0.0.1:5000", secrets.registry_credentials(), tmp_path) as path:
        assert path is not None and path.name.startswith(f"auth-{os.getpid()}-")
    assert not stale.exists() and not old.exists() and live.exists()

