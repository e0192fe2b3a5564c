"""The configuration reference, generated from egd's config schema so that it cannot drift from the code.

The schema is what ``egd check-config`` enforces: the sections of :class:`egd.config.Config` with the keys each
accepts (``egd.config._SCHEMA``), and for every built-in driver (the ``egd.drivers`` entry points) the keys of its
``settings_type`` (nested settings sections included). Types and defaults come from the dataclasses; each key's
description comes from ``docs/config-keys.yaml`` (dotted path -> reStructuredText). :func:`schema_entries` is plain
Python, shared with ``tests/test_config_reference.py``, which fails when a key has no description or a
description names a key that no longer exists; the Sphinx directive ``egd-config-reference`` renders it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

#: Where the descriptions are, beside this directory.
KEYS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config-keys.yaml")

#: The built-in drivers in the order of the documentation (others after them, by name).
_ORDER = ("local", "ssh", "yarn", "kubernetes", "docker", "slurm")

#: Fields of Config that are not sections of the file.
_NOT_KEYS = frozenset({"source"})


@dataclass(frozen=True)
class Entry:
    """One section or key of the configuration file, as the schema defines it."""

    path: str  #: dotted, e.g. ``kernels.port_range`` or ``drivers.ssh``
    section: bool  #: a mapping of keys (documented as a heading) rather than a key
    type: str = ""  #: the field's annotation, as written in the code
    default: Any = None
    required: bool = False  #: no default: the file must set it


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


def _settings_entries(cls: type, path: str, schema: Mapping[str, Any]) -> Iterator[Entry]:
    """The keys ``schema`` accepts, with the type and default of ``cls``'s field of the same name; a key whose
    default is itself a settings section (a dataclass with a schema) is walked as a section."""
    yield Entry(path, True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in schema:
        item = fields[key]
        default = _default(item)
        nested: Any = type(default) if dataclasses.is_dataclass(default) else None
        if nested is not None and hasattr(nested, "schema"):
            yield from _settings_entries(nested, f"{path}.{key}", nested.schema)
        else:
            required = default is dataclasses.MISSING
            yield Entry(f"{path}.{key}", False, str(item.type), None if required else default, required)


def builtin_drivers() -> dict[str, Any]:
    """The drivers egd installs (entry points into ``egd.drivers``), by name: a third party's are not egd's to
    document."""
    from egd.plugins import available_drivers, load_driver_class

    problems: list[str] = []
    names = sorted((name for name, entry in available_drivers().items() if entry.value.startswith("egd.drivers.")),
                   key=lambda name: (_ORDER.index(name) if name in _ORDER else len(_ORDER), name))
    found = {name: load_driver_class(name, problems) for name in names}
    if problems:
        raise RuntimeError("; ".join(problems))
    return found


def schema_entries() -> list[Entry]:
    """Every section and key of the configuration file, in the order of the code."""
    from egd import config

    entries: list[Entry] = []
    for section in dataclasses.fields(config.Config):
        if section.name in _NOT_KEYS:
            continue
        if section.name == "drivers":
            entries.append(Entry("drivers", True))
            for name, driver in builtin_drivers().items():
                settings = driver.settings_type
                entries.extend(_settings_entries(settings, f"drivers.{name}", settings.schema))
            continue
        cls = typing.get_type_hints(config.Config)[section.name]
        entries.extend(_settings_entries(cls, section.name, config._SCHEMA[cls]))
    return entries


def descriptions(path: str = KEYS_FILE) -> dict[str, Any]:
    """``docs/config-keys.yaml``: dotted path -> text, or -> {text, default, type} where ``default`` or ``type``
    replaces what the code says (a default computed on the build machine, such as an installed path)."""
    with open(path, encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    return {str(key): value if isinstance(value, dict) else {"text": value} for key, value in loaded.items()}


def shared(path: str) -> str:
    """``drivers.ssh.callback_host`` -> ``drivers.*.callback_host``: a description every driver with that key shares
    (the settings drivers inherit from egd's driver toolkit), unless one of its own replaces it."""
    parts = path.split(".")
    return ".".join(["drivers", "*", *parts[2:]]) if len(parts) > 2 and parts[0] == "drivers" else path


def description(path: str, described: Mapping[str, Any]) -> dict[str, Any] | None:
    """The description of ``path``: its own, else the one its drivers share."""
    return described.get(path) or described.get(shared(path))


def problems(entries: list[Entry], described: Mapping[str, Any]) -> list[str]:
    """Keys without a description, and descriptions of keys the schema does not have."""
    paths = {entry.path for entry in entries}
    known = paths | {shared(p) for p in paths}
    missing = [f"{p}: in the schema, not described in docs/config-keys.yaml"
               for p in sorted(p for p in paths if description(p, described) is None)]
    stale = [f"{p}: described in docs/config-keys.yaml, not in the schema" for p in sorted(set(described) - known)]
    empty = [f"{p}: empty description" for p, d in sorted(described.items()) if not str(d.get("text") or "").strip()]
    return missing + stale + empty


def _yaml_value(value: Any) -> str:
    """A default as it would be written in the YAML file."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, Mapping):
        value = dict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


#: Annotations as a reader of the YAML file knows them.
_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "tuple[str, ...]": "list of strings",
          "tuple[int, ...]": "list of integers", "tuple[int, int]": "port range (\"LOW..HIGH\")",
          "Mapping[str, str]": "mapping of strings", "Mapping[str, Any]": "mapping",
          "Mapping[str, int]": "mapping of integers", "Mapping[str, tuple[str, ...]]": "mapping of lists of strings",
          "tuple[UserCredential, ...]": "mapping of users", "JWTConfig": "mapping"}


def type_text(annotation: str) -> str:
    """``str | None`` -> ``string or null``."""
    parts = [p.strip() for p in annotation.split(" | ")]
    nullable = "None" in parts
    named = [_TYPES.get(p, p) for p in parts if p != "None"]
    return " or ".join(named + (["null"] if nullable else []))


def render(entries: list[Entry], described: Mapping[str, Any]) -> list[str]:
    """The reference as reStructuredText lines: a heading per section, a ``confval`` per key (so that any page
    can link a key with ``:confval:`kernels.port_range```)."""
    from egd.config import ENV_OVERRIDES

    by_key = {key: env for env, key in ENV_OVERRIDES.items()}
    lines: list[str] = []
    for entry in entries:
        about = description(entry.path, described) or {}
        text = str(about.get("text") or "").strip().splitlines()
        if entry.section:
            title = f"``{entry.path}``"
            underline = "-" if entry.path.count(".") == 0 else "~" if entry.path.count(".") == 1 else "^"
            lines += ["", f".. _config-{entry.path}:", "", title, underline * len(title), "", *text, ""]
            continue
        default = about.get("default") or ("required" if entry.required else f"``{_yaml_value(entry.default)}``")
        lines += ["", f".. confval:: {entry.path}", f"   :type: {about.get('type') or type_text(entry.type)}",
                  f"   :default: {default}", ""]
        if entry.path in by_key:
            text = [*text, "", f"Environment: ``{by_key[entry.path]}`` (wins over the file)."]
        lines += [f"   {line}" if line else "" for line in text]
    return lines


def setup(app: Any) -> dict[str, Any]:
    """The Sphinx extension: the ``egd-config-reference`` directive."""
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective
    from sphinx.util.nodes import nested_parse_with_titles

    class ConfigReference(SphinxDirective):
        """Every section and key of egd's configuration, from the schema, with its description."""

        def run(self) -> list[nodes.Node]:
            entries = schema_entries()
            described = descriptions()
            self.env.note_dependency(KEYS_FILE)
            found = problems(entries, described)
            if found:
                raise self.error("configuration reference: " + "; ".join(found))
            container = nodes.section()
            container.document = self.state.document
            nested_parse_with_titles(self.state, StringList(render(entries, described), KEYS_FILE), container)
            return list(container.children)

    app.add_directive("egd-config-reference", ConfigReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
