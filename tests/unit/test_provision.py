"""`kiln disk --etc DEST=FILE`: what is refused, located, before any disk work (builder.disk.provision)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from builder.core.errors import UsageError
from builder.disk.provision import ETC_UPPER, check_unique, parse_etc, place_etc_files

pytestmark = pytest.mark.unit


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(("spec", "says"), [
    ("kiln/agent.json", "expected DEST=FILE"),
    ("=x", "expected DEST=FILE"),
    ("/etc/kiln/agent.json={f}", "plain path under /etc"),
    ("kiln/../shadow={f}", "plain path under /etc"),
    ("kiln//a={f}", "plain path under /etc"),
    ("kiln/x.conf={missing}", "is not a file"),
])
def test_bad_specs_are_refused_with_the_option(tmp_path: Path, spec: str, says: str) -> None:
    f = write(tmp_path / "f", "x")
    spec = spec.format(f=f, missing=tmp_path / "nope")
    with pytest.raises(UsageError) as err:
        parse_etc(spec)
    assert f"--etc {spec}" in str(err.value) and says in str(err.value)


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "not valid JSON"),
    ("[1]", "expected a JSON object"),
    ('{"registy": "10.0.2.2:5000"}', "unknown key registy"),
    ('{"insecure": "yes"}', "insecure: expected true or false"),
    ('{"channel": 3}', "channel: expected a string"),
    ('{"timeouts": {"fetch": 0}}', "timeouts.fetch: must be above 0"),
    ('{"timeouts": {"download": 10}}', "timeouts: unknown key download"),
    ('{"fleet": {"url": "http://10.0.2.2:8443"}}', "fleet.url: 'http://10.0.2.2:8443': the fleet service is reached "
                                                   "over TLS"),
    ('{"fleet": {"outboxMax": -1}}', "fleet.outboxMax: must be above 0"),
    ('{"fleet": {"identity": "hsm"}}', "fleet.identity: 'hsm' (a string) is not one of auto, tpm, file"),
    ('{"window": "2am-4am"}', "window: '2am-4am': expected HH:MM-HH:MM"),
])
def test_agent_json_is_checked_as_the_agent_reads_it(tmp_path: Path, content: str, says: str) -> None:
    f = write(tmp_path / "agent.json", content)
    with pytest.raises(UsageError) as err:
        parse_etc(f"kiln/agent.json={f}")
    assert says in str(err.value) and str(f) in str(err.value)


def test_files_land_in_the_etc_overlay_with_their_mode(tmp_path: Path) -> None:
    agent = write(tmp_path / "agent.json", json.dumps({"registry": "10.0.2.2:5000", "timeouts": {"fetch": 7200}}))
    token = write(tmp_path / "token", "secret\n", 0o600)
    files = [parse_etc(f"kiln/agent.json={agent}"), parse_etc(f"kiln/enroll/token={token}")]
    tree = tmp_path / "data"
    place_etc_files(files, tree)
    placed = tree / ETC_UPPER / "kiln/enroll/token"
    assert placed.read_text() == "secret\n" and stat.S_IMODE(placed.stat().st_mode) == 0o600
    assert stat.S_IMODE((tree / ETC_UPPER / "kiln/enroll").stat().st_mode) == 0o755
    assert json.loads((tree / ETC_UPPER / "kiln/agent.json").read_text())["registry"] == "10.0.2.2:5000"
    record = files[1].record()
    assert record["path"] == "/etc/kiln/enroll/token" and record["mode"] == "0600"
    assert "secret" not in json.dumps(record)  # a digest, never the content


def test_the_same_destination_twice_is_refused(tmp_path: Path) -> None:
    a, b = write(tmp_path / "a", "{}"), write(tmp_path / "b", "{}")
    with pytest.raises(UsageError, match="given twice"):
        check_unique([parse_etc(f"kiln/agent.json={a}"), parse_etc(f"kiln/agent.json={b}")])
