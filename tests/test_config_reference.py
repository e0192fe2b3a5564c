"""The configuration reference (docs/configuration.rst) is generated from the config schema by
``docs/_ext/configref.py``, with each key's description from ``docs/config-keys.yaml``: every key egd accepts is
described there, nothing is described that egd does not accept, and every path the reference names is a key
``egd check-config`` knows."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from egd.config import ENV_OVERRIDES, ConfigError, parse_config

DOCS = Path(__file__).resolve().parent.parent / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import configref  # noqa: E402 - from docs/_ext, put on the path above


def test_every_key_of_the_schema_is_described_and_nothing_else() -> None:
    """The test that keeps the reference complete: a key added to the schema without a line in
    docs/config-keys.yaml, or a line left for a key that is gone, is named here."""
    assert configref.problems(configref.schema_entries(), configref.descriptions()) == []


def test_an_undescribed_key_and_a_stale_description_are_both_named() -> None:
    """The check itself can fail: a schema key without a description, and a description without a key."""
    entries = [*configref.schema_entries(), configref.Entry("kernels.brand_new", False, "int", 1)]
    described = {**configref.descriptions(), "server.long_gone": {"text": "was here"}}
    problems = configref.problems(entries, described)
    assert problems == ["kernels.brand_new: in the schema, not described in docs/config-keys.yaml",
                        "server.long_gone: described in docs/config-keys.yaml, not in the schema"]


def test_a_shared_driver_description_counts_for_every_driver_with_the_key() -> None:
    """``drivers.*.KEY`` describes KEY of each driver that has no description of its own; one for a key no driver
    has is stale."""
    described = configref.descriptions()
    assert configref.description("drivers.yarn.callback_port", described) == described["drivers.*.callback_port"]
    assert configref.description("drivers.ssh.hosts", described) == described["drivers.ssh.hosts"]
    stale = configref.problems(configref.schema_entries(), {**described, "drivers.*.no_such": {"text": "x"}})
    assert stale == ["drivers.*.no_such: described in docs/config-keys.yaml, not in the schema"]


def _nested(path: str, value: Any) -> dict[str, Any]:
    """``a.b.c`` = value as the YAML mapping {a: {b: {c: value}}}."""
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _unknown(path: str) -> list[str]:
    """The problems ``egd check-config`` reports about ``path`` being an unknown key (set to a junk value: its own
    checker may refuse it, which is not what is asked here)."""
    try:
        parse_config(yaml.safe_dump(_nested(path, ["junk"])), "reference", environ={})
    except ConfigError as exc:
        return [p for p in exc.problems if p.startswith(f"{path}: unknown")]
    return []


def test_every_key_in_the_reference_is_one_the_config_accepts() -> None:
    """The walk reads the schema egd checks files with: every key it lists is known to the parser (a key the
    parser did not know would be reported as unknown), for the gateway's sections and every built-in driver."""
    keys = [entry.path for entry in configref.schema_entries() if not entry.section]
    assert {key.split(".")[1] for key in keys if key.startswith("drivers.")} >= {
        "local", "ssh", "yarn", "kubernetes", "docker", "slurm"}
    assert [key for key in keys if _unknown(key)] == []
    assert _unknown("server.no_such_key") != []  # the probe does see an unknown key


@pytest.mark.parametrize("path", ["server.port", "kernels.port_range", "drivers.ssh.hosts",
                                  "drivers.yarn.distributed_shell.am_memory_mb", "state.on_stop"])
def test_the_rendered_reference_has_each_key_with_type_default_and_text(path: str) -> None:
    """Each key becomes a ``confval`` (linkable from any page) with its type, default and description; keys with an
    environment override name the variable."""
    lines = configref.render(configref.schema_entries(), configref.descriptions())
    start = lines.index(f".. confval:: {path}")
    block = "\n".join(lines[start:start + 12])
    assert ":type:" in block and ":default:" in block
    entry = next(e for e in configref.schema_entries() if e.path == path)
    assert (entry.required and ":default: required" in block) or f"``{configref._yaml_value(entry.default)}``" in block
    text = configref.description(path, configref.descriptions())
    assert text is not None and str(text["text"]).split()[0] in block


def test_the_environment_overrides_are_named_in_the_reference() -> None:
    """Every EGD_* variable that overrides a key appears at that key."""
    rendered = "\n".join(configref.render(configref.schema_entries(), configref.descriptions()))
    for variable, key in ENV_OVERRIDES.items():
        at = rendered.index(f".. confval:: {key}\n")
        following = rendered[at:rendered.find(".. confval::", at + 1)]
        assert f"``{variable}``" in following, (variable, key)
