"""What an image bakes from the release key: the public key, the containers policy that checks image
signatures with it, and the TUF root its channels are verified with.

    files = finalize_device_files("qemu-x86_64", key)   # baked under /usr/lib/kiln/
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.keys.release_key import SigningKey
from kiln_device import contract

IDENTITY_PREFIX = "release.kiln.invalid/kiln"
# Where images carry the verification material (read-only /usr).
DEVICE_KEY_PATH = contract.RELEASE_KEY
DEVICE_POLICY_PATH = contract.POLICY_JSON


def signed_identity(cls: str) -> str:
    """The repository every signature of CLASS names (exactRepository in the policy)."""
    return f"{IDENTITY_PREFIX}/{cls}"


def render_policy(cls: str, key_path: str | Path = DEVICE_KEY_PATH) -> str:
    """containers-policy.json: every docker image must be signed by the release key for CLASS.

    Everything else (other transports) is rejected. The identity rule survives tags:
    a channel tag and a version tag of the same digest verify with the same signature."""
    policy = {
        "default": [{"type": "reject"}],
        "transports": {
            "docker": {
                "": [{
                    "type": "signedBy",
                    "keyType": "GPGKeys",
                    "keyPath": str(key_path),
                    "signedIdentity": {"type": "exactRepository", "dockerRepository": signed_identity(cls)},
                }],
            },
        },
    }
    return json.dumps(policy, indent=2) + "\n"


def render_registries_d(lookaside: str, *, scope: str | None = None, staging: str | None = None) -> str:
    """registries.d YAML: where signatures are read (lookaside) and written (lookaside-staging).

    With `scope` (host[:port][/path]) it applies to that registry only, otherwise to all."""
    body = [f"lookaside: {json.dumps(lookaside)}"]
    if staging:
        body.append(f"lookaside-staging: {json.dumps(staging)}")
    head, indent = (["docker:", f"  {json.dumps(scope)}:"], "    ") if scope else (["default-docker:"], "  ")
    return "# Written by Kiln. Edits are overwritten.\n" + "\n".join(head + [indent + x for x in body]) + "\n"


def finalize_device_files(cls: str, key: SigningKey) -> dict[str, bytes]:
    """What an image of CLASS bakes under /usr (path relative to / -> bytes): the release key and the
    policy that checks image signatures, and the TUF root its channel is verified with (builder.release.trust)
    when the key directory has one."""
    from builder.keys.tuf_keys import trust_root

    files = {
        DEVICE_KEY_PATH.lstrip("/"): key.public_key.read_bytes(),
        DEVICE_POLICY_PATH.lstrip("/"): render_policy(cls).encode(),
    }
    root = trust_root(key.directory)
    if root is not None:
        files[contract.TRUST_ROOT.lstrip("/")] = root
    return files

