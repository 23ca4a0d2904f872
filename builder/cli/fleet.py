"""`kiln fleet` (the service, enrollment tokens, the fleet's state) and `kiln rollout` (waves, halts)."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import click

from builder.cli.channel import LOOKASIDE_OPTION, lookaside_dir
from builder.cli.common import cli_context

DB_ENV = "KILN_FLEET_DB"


def default_db() -> str:
    return os.environ.get(DB_ENV) or f"sqlite:///{cli_context().state.root / 'fleet' / 'fleet.db'}"


def default_tls_dir() -> Path:
    return cli_context().state.root / "fleet" / "tls"


DB_OPTION = click.option("--db", default=None, metavar="URL",
                         help="sqlite:///PATH (relative; sqlite:////PATH absolute; default: the state dir's "
                              f"fleet/fleet.db) or postgresql://USER@HOST/DB; "
                              f"also ${DB_ENV}. Give a PostgreSQL password in ~/.pgpass or $PGPASSWORD, never here.")
TLS_OPTION = click.option("--tls-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                          help="The service's CA and certificate (default: the state dir's fleet/tls).")


def open_db(db: str | None):  # type: ignore[no-untyped-def]
    from urllib.parse import urlsplit

    from builder.core.errors import UsageError
    from builder.fleet.store import open_store

    if db and "://" in db and urlsplit(db).password is not None:
        raise UsageError("--db: the URL carries a password, which would be on the command line (ps, the shell's "
                         "history, CI logs)", hint=f"put it in ~/.pgpass or $PGPASSWORD, or the whole URL in ${DB_ENV}")
    store = open_store(db or default_db())
    store.migrate()
    return store


@click.group("fleet")
def fleet_group() -> None:
    """The fleet service: devices enroll and report what happened to them; rollouts halt on failures.

    Optional: a device with no fleet service configured still updates from its channel.
    docs/fleet.md has the protocol and the operations.
    """


@fleet_group.command("init")
@click.argument("tls_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--host", "hosts", multiple=True, required=True,
              help="A name or address devices reach the service at (repeat); goes in its certificate.")
@click.option("--renew", is_flag=True, help="Issue the service certificate again (new hosts, near expiry).")
@DB_OPTION
def fleet_init(tls_dir: Path | None, hosts: tuple[str, ...], renew: bool, db: str | None) -> None:
    """Make the service's CA and TLS certificate, and the database (migrated to this Kiln's schema)."""
    from builder.fleet import pki

    directory = tls_dir or default_tls_dir()
    made = pki.init(directory, list(hosts), renew=renew)
    store = open_db(db)
    for path in made:
        click.echo(f"wrote {path}")
    click.echo(f"database {store.describe()} at schema version {store.version()}")
    click.echo(f"devices trust {directory / 'ca.pem'}: flash it with `kiln disk --etc kiln/fleet-ca.pem="
               f"{directory / 'ca.pem'}`")


@fleet_group.command("migrate")
@DB_OPTION
def fleet_migrate(db: str | None) -> None:
    """Bring the database to this Kiln's schema (versioned migrations; never downgrades)."""
    from builder.fleet.store import open_store

    store = open_store(db or default_db())
    done = store.migrate()
    click.echo(f"{store.describe()}: " + (f"applied {', '.join(map(str, done))}" if done else "up to date")
               + f"; schema version {store.version()}")


@fleet_group.command("serve")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, metavar="HOST:PORT")
@TLS_OPTION
@DB_OPTION
@click.option("--key", "key_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Key directory whose tuf/rollout.pem and tuf/online.pem sign automatic halts; without it the "
                   "service reports failures but halts nothing.")
@LOOKASIDE_OPTION
@click.option("--tick", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between two checks for rollouts to promote (rollout.autoPromote).")
@click.option("--operator-listen", default="127.0.0.1:8444", show_default=True, metavar="HOST:PORT",
              help="Where operators read the fleet's state (/v1/status, the HTML page); devices never can. Off "
                   "the loopback it needs --operator-token-file. `none`: no operators' listener.")
@click.option("--operator-token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="A file whose first line is the operators' bearer token (`Authorization: Bearer ...`).")
@click.option("--max-connections", default=1000, show_default=True, type=click.IntRange(1, 100_000),
              help="Connections and requests served at once; beyond, a 503 (devices retry with backoff).")
def fleet_serve(listen: str, tls_dir: Path | None, db: str | None, key_dir: Path | None,
                lookaside: Path | None, tick: float, operator_listen: str, operator_token_file: Path | None,
                max_connections: int) -> None:
    """Serve enrollment and reports to devices, and the fleet's state to operators, over TLS until stopped."""
    from builder.core.errors import UsageError
    from builder.fleet.service import serve
    from builder.keys.tuf_keys import TrustKeys
    from builder.release.trust import Repository

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen {listen!r}: expected HOST:PORT")
    operator = None
    if operator_listen != "none":
        op_host, _, op_port = operator_listen.rpartition(":")
        if not op_host or not op_port.isdigit():
            raise UsageError(f"--operator-listen {operator_listen!r}: expected HOST:PORT or none")
        operator = (op_host.strip("[]"), int(op_port))
    operator_token = None
    if operator_token_file is not None:
        lines = operator_token_file.read_text().splitlines()
        operator_token = lines[0].strip() if lines else ""
        if len(operator_token) < 16:
            raise UsageError(f"--operator-token-file {operator_token_file}: the token is shorter than 16 characters")
    store = open_db(db)
    repo = None
    if key_dir is not None:
        repo = Repository(lookaside_dir(lookaside) / "tuf", TrustKeys.load(key_dir, only=("rollout", "online")))
    click.echo(f"kiln fleet: devices https://{listen}, operators "
               f"{'https://' + operator_listen if operator else 'none'} ({store.describe()}, schema "
               f"{store.version()}; automatic halt {'on: ' + str(repo.dir) if repo else 'off (no --key)'})", err=True)
    serve(store, repo, host=host.strip("[]"), port=int(port), tls_dir=tls_dir or default_tls_dir(), tick=tick,
          operator=operator, operator_token=operator_token, max_connections=max_connections)


@fleet_group.command("token")
@click.argument("cls", metavar="CLASS")
@click.option("--uses", default=1, show_default=True, type=click.IntRange(1, 1_000_000),
              help="How many devices may enroll with it (one per device by default).")
@click.option("--expires-days", default=30.0, show_default=True, type=click.FloatRange(min=0.001))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the token to FILE (mode 0600): what `kiln disk --etc kiln/enroll.token=FILE` flashes.")
@click.option("--stdout", "to_stdout", is_flag=True,
              help="Print the token on stdout instead (it is a secret: not where a CI log keeps it).")
@DB_OPTION
def fleet_token(cls: str, uses: int, expires_days: float, out: Path | None, to_stdout: bool, db: str | None) -> None:
    """Make an enrollment token for CLASS devices (its hash is stored; the token itself is given once, to --out
    FILE or, with --stdout, printed)."""
    from builder.cli.common import checked
    from builder.core import safe
    from builder.core.errors import KilnError
    from builder.fleet.service import token_hash
    from builder.spec import loader

    checked("CLASS", safe.name, cls)
    if (out is None) == (not to_stdout):
        raise click.UsageError("give --out FILE (written 0600) or --stdout: the token is a secret, and is given once")
    try:
        loader.resolve_class_path(cls)
    except KilnError:  # the service's host may have no class files: a warning, not a refusal
        click.echo(f"warning: no class named {cls!r} in this project's images/; the token is for {cls!r} anyway",
                   err=True)
    token = secrets.token_urlsafe(32)
    store = open_db(db)
    store.add_token(token_hash(token), cls, uses, time.time() + expires_days * 86400)
    if out is None:
        click.echo(token)  # --stdout, asked for
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    click.echo(f"wrote a token for {uses} {cls} device(s), valid {expires_days:g} days, to {out}", err=True)


@fleet_group.command("allow")
@click.argument("cls", metavar="CLASS")
@click.option("--serial", "serials", multiple=True, metavar="SERIAL",
              help="A device serial to accept on enrollment (repeat it; one device per serial).")
@click.option("--serials-from", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="A file of serials, one per line (the factory's list).")
@click.option("--any-device", is_flag=True,
              help="Accept every new device of CLASS (a development or test fleet: a token alone then enrolls).")
@click.option("--list", "show", is_flag=True, help="Print CLASS's allow-list instead.")
@DB_OPTION
def fleet_allow(cls: str, serials: tuple[str, ...], serials_from: Path | None, any_device: bool, show: bool,
                db: str | None) -> None:
    """The allow-list of CLASS: new devices whose serial it names are accepted on enrollment; every other new
    device waits as pending until `kiln fleet accept`."""
    from builder.cli.common import checked
    from builder.core import safe
    from builder.fleet.store import ANY_SERIAL

    checked("CLASS", safe.name, cls)
    store = open_db(db)
    if show:
        for _, serial in store.allowed(cls):
            click.echo("every device" if serial == ANY_SERIAL else serial)
        return
    wanted = list(serials)
    if serials_from is not None:
        wanted += [s.strip() for s in serials_from.read_text().splitlines() if s.strip() and not s.startswith("#")]
    for serial in wanted:
        if serial == ANY_SERIAL or len(serial) > 128 or not serial.isprintable():
            raise click.UsageError(f"serial {serial[:40]!r}: expected up to 128 printable characters, "
                                   f"not {ANY_SERIAL!r}")
    if any_device:
        wanted.append(ANY_SERIAL)
    if not wanted:
        raise click.UsageError("give --serial SERIAL, --serials-from FILE or --any-device (or --list)")
    added = store.allow(cls, wanted)
    what = "every new device" if any_device else f"{len(wanted)} serial(s), {added} new"
    click.echo(f"{cls}: allowed {what}", err=True)


@fleet_group.command("devices")
@click.argument("cls", metavar="CLASS", required=False)
@click.option("--pending", "state", flag_value="pending", help="Only the devices waiting for acceptance.")
@click.option("--rejected", "state", flag_value="rejected", help="Only the rejected devices.")
@click.option("--json", "as_json", is_flag=True)
@DB_OPTION
def fleet_devices(cls: str | None, state: str | None, as_json: bool, db: str | None) -> None:
    """The enrolled devices (of CLASS): id, state, key type and origin, serial, version, last seen."""
    from builder.core.output import inert

    rows = open_db(db).devices(cls, state)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for d in rows:
        click.echo(inert(f"{d['id']}  {d['state']:8}  {d['class']}  {d['key_type']}/{d['key_origin']}  "
                         f"serial {d['serial'] or '-'}  {d['version'] or '-'}  last seen {d['last_seen'] or 'never'}"))
    if not rows:
        click.echo("no devices", err=True)


def _set_state(devices: tuple[str, ...], state: str, db: str | None) -> None:
    from kiln_device.fleet import is_device_id

    bad = [d for d in devices if not is_device_id(d)]
    if bad:
        raise click.UsageError(f"not device ids (kd- and 24 hex digits): {', '.join(repr(d[:40]) for d in bad)}")
    unknown = open_db(db).set_state(list(devices), state)
    if unknown:
        raise click.ClickException(f"not enrolled here: {', '.join(unknown)} (the others are {state})")
    click.echo(f"{len(devices)} device(s) {state}", err=True)


@fleet_group.command("accept")
@click.argument("devices", metavar="DEVICE...", nargs=-1, required=True)
@DB_OPTION
def fleet_accept(devices: tuple[str, ...], db: str | None) -> None:
    """Accept pending devices: their reports are taken from now on, and count toward halts and promotions."""
    _set_state(devices, "accepted", db)


@fleet_group.command("reject")
@click.argument("devices", metavar="DEVICE...", nargs=-1, required=True)
@DB_OPTION
def fleet_reject(devices: tuple[str, ...], db: str | None) -> None:
    """Reject devices: their reports and enrollments are refused from now on (a farmed or stolen identity)."""
    _set_state(devices, "rejected", db)


@fleet_group.command("status")
@click.argument("cls", metavar="[CLASS]", required=False)
@DB_OPTION
@LOOKASIDE_OPTION
@click.option("--json", "as_json", is_flag=True)
def fleet_status(cls: str | None, db: str | None, lookaside: Path | None, as_json: bool) -> None:
    """Per class: versions in the field, rollout waves, failures with top reasons, stale and degraded devices."""
    from builder.fleet import views
    from builder.release.trust import open_repository

    store = open_db(db)
    repo = open_repository(lookaside_dir(lookaside), None)
    data = views.fleet_status(store, repo if repo.exists() else None, cls)
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else views.render_text(data))


# --- kiln rollout ---------------------------------------------------------------------------


def _repo(key_dir: Path | None, lookaside: Path | None):  # type: ignore[no-untyped-def]
    from builder.keys.tuf_keys import TrustKeys
    from builder.release.trust import Repository

    keys = TrustKeys.load(key_dir, only=("rollout", "online")) if key_dir else TrustKeys({})
    return Repository(lookaside_dir(lookaside) / "tuf", keys)


def _channel(cls: str, channel: str | None) -> str:
    """--channel (needs no class file: the service's host may have none), else the class's rollout.channel."""
    if channel and channel.strip():
        return channel
    from builder.cli.common import load
    from builder.release.flow import finalize_channel

    return finalize_channel(load(cls).spec.rollout.channel, channel)


CHANNEL_OPTION = click.option("--channel", default=None, help="Channel (default: the class's rollout.channel).")
KEY_OPTION = click.option("--key", "key_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
                          help="Key directory whose tuf/rollout.pem and tuf/online.pem sign the change.")


@click.group("rollout")
def rollout_group() -> None:
    """A release's staged rollout: waves from the class's rollout.stages, halted on failures.

    The state is signed into the channel's TUF metadata (the delegated rollout role), so devices
    learn that their wave is open, or that the rollout is halted, without the fleet service.
    """


@rollout_group.command("status")
@click.argument("cls", metavar="CLASS")
@CHANNEL_OPTION
@LOOKASIDE_OPTION
@click.option("--db", default=None, metavar="URL", help="Also show each wave's failures (the fleet database).")
@click.option("--json", "as_json", is_flag=True)
def rollout_status(cls: str, channel: str | None, lookaside: Path | None, db: str | None, as_json: bool) -> None:
    """The rollout of CLASS: version, open waves, soak left, halt."""
    from builder.fleet import views
    from builder.release import rollout

    channel = _channel(cls, channel)
    state = rollout.require(_repo(None, lookaside).rollout(cls, channel), cls, channel)
    if db or os.environ.get(DB_ENV):
        store = open_db(db)
        state = views.wave_table(store, cls, store.devices(cls), state)
    if as_json:
        click.echo(json.dumps(state, indent=2, sort_keys=True))
        return
    click.echo(f"{cls} on {channel}: {rollout.describe(state)}")
    for w in state.get("waves", []):
        click.echo(f"  wave {w['wave']} ({w['percent']}%{', open' if w['open'] else ''}): {w['devices']} devices, "
                   f"{w['tried']} tried, {w['succeeded']} succeeded, {w['failed']} failed")


@rollout_group.command("advance")
@click.argument("cls", metavar="CLASS")
@CHANNEL_OPTION
@KEY_OPTION
@LOOKASIDE_OPTION
@click.option("--force", is_flag=True, help="Open the next wave before the current one has soaked.")
def rollout_advance(cls: str, channel: str | None, key_dir: Path, lookaside: Path | None, force: bool) -> None:
    """Open the next wave of CLASS's rollout (once the current wave has soaked)."""
    from builder.release import rollout

    channel = _channel(cls, channel)
    state = rollout.advance(_repo(key_dir, lookaside), cls, channel, force=force)
    click.echo(f"{cls} on {channel}: {rollout.describe(state)}")


@rollout_group.command("halt")
@click.argument("cls", metavar="CLASS")
@CHANNEL_OPTION
@KEY_OPTION
@LOOKASIDE_OPTION
@click.option("--reason", required=True, help="Why: devices and the fleet view show it.")
def rollout_halt(cls: str, channel: str | None, key_dir: Path, lookaside: Path | None, reason: str) -> None:
    """Halt CLASS's rollout: devices not yet updated wait; no later wave starts."""
    from builder.release import rollout

    channel = _channel(cls, channel)
    state = rollout.halt(_repo(key_dir, lookaside), cls, channel, reason, by=os.environ.get("USER") or "kiln")
    click.echo(f"{cls} on {channel}: {rollout.describe(state)}")


@rollout_group.command("resume")
@click.argument("cls", metavar="CLASS")
@CHANNEL_OPTION
@KEY_OPTION
@LOOKASIDE_OPTION
def rollout_resume(cls: str, channel: str | None, key_dir: Path, lookaside: Path | None) -> None:
    """Resume CLASS's halted rollout at the wave where it stopped."""
    from builder.release import rollout

    channel = _channel(cls, channel)
    state = rollout.resume(_repo(key_dir, lookaside), cls, channel)
    click.echo(f"{cls} on {channel}: {rollout.describe(state)}")
