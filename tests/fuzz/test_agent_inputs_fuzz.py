"""The fuzz tier: the agent's inputs (release.json, agent.json and its /etc override, the channel's signed TUF
`custom` fields and rollout state) from generated JSON. Each parser either returns its typed record or raises its
located error (ContractError: the file and the field); never any other exception, which on a device would be a
traceback instead of a refusal."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln_device.channel import parse_rollout, parse_target_custom
from kiln_device.contract import parse_agent_file, parse_release
from kiln_device.typed import ContractError

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES") or 200) * 2
keys = st.sampled_from(["class", "compatible", "version", "models", "runtime", "bootTries", "fleet", "window",
                        "slots", "timeouts", "url", "batch", "outboxMax", "serial", "stages", "wave", "halted",
                        "schemaVersion", "minVersion", "withdrawn", "sha256", "name", "percent", "$comment"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(keys, st.text(max_size=8)), inner,
                                                                       max_size=6)), max_leaves=30)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=values, which=st.sampled_from(["release", "agent", "custom", "rollout"]))
def test_every_parser_returns_a_record_or_a_located_error(data: Any, which: str) -> None:
    parse = {"release": lambda d: parse_release(d, "release.json"),
             "agent": lambda d: parse_agent_file(d, "agent.json"),
             "custom": lambda d: parse_target_custom(d, "the target tiny/stable/1.0.0"),
             "rollout": lambda d: parse_rollout(d, "the rollout target")}[which]
    try:
        parse(data)
    except ContractError as exc:
        assert str(exc).split(":", 1)[0] in ("release.json", "agent.json", "the target tiny/stable/1.0.0",
                                             "the rollout target"), exc
