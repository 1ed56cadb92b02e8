"""``toolkit tune --apply``: the winner's values written into the user's model.yaml, comments kept.

model.yaml is the user's file, with comments that say why a value is what it is; a YAML dump would drop
them. So only the values change, in place: PyYAML's composer gives each value's position in the text,
that span is replaced, and a field the file does not have yet is added (at the end of the file, or as the
first key of ``dynamic_batching``). The result is parsed and validated as a spec again before it replaces
the file, and must hold exactly the new values.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from toolkit.errors import SpecError, TuneError
from toolkit.repository.spec import ModelSpec, parse_spec

#: Our field -> its path in model.yaml.
PATHS = {"instance_count": ("instance_count",), "max_batch_size": ("max_batch_size",),
         "max_queue_delay_microseconds": ("dynamic_batching", "max_queue_delay_microseconds")}


def apply_changes(model_yaml: Path, changes: dict[str, int]) -> str:
    """Writes ``changes`` (``{field: new value}``, fields of ``PATHS``) into ``model_yaml``; returns the new text."""
    try:
        text = model_yaml.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except (OSError, yaml.YAMLError) as e:
        raise TuneError(f"{model_yaml}: cannot read it to write the tuned values ({e})") from e
    if not isinstance(root, yaml.MappingNode):
        raise TuneError(f"{model_yaml}: not a mapping of fields")
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in the original text
    appended = []
    for field, value in changes.items():
        *parents, key = PATHS[field]
        mapping = root
        for parent in parents:
            child = _value(mapping, parent)
            if not isinstance(child, yaml.MappingNode):
                raise TuneError(f"{model_yaml}: no '{parent}' mapping to write {key}: {value} into")
            mapping = child
        node = _value(mapping, key)
        if node is not None:
            if not isinstance(node, yaml.ScalarNode):
                raise TuneError(f"{model_yaml}: '{'.'.join(PATHS[field])}' is not a plain value")
            edits.append((node.start_mark.index, node.end_mark.index, str(value)))
        elif mapping is root:
            appended.append(f"{key}: {value}  # written by toolkit tune --apply\n")
        else:
            edits.append(_first_key(text, mapping, f"{key}: {value}"))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    if appended:
        text = text + ("" if text.endswith("\n") else "\n") + "".join(appended)
    _check(model_yaml, text, changes)
    temporary = model_yaml.with_name(f".{model_yaml.name}.tune")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, model_yaml)
    return text


def _value(mapping: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((v for k, v in mapping.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)


def _first_key(text: str, mapping: yaml.MappingNode, entry: str) -> tuple[int, int, str]:
    """An insertion that makes ``entry`` the first key of ``mapping`` (block or flow style)."""
    if mapping.flow_style:
        at = text.index("{", mapping.start_mark.index) + 1
        return at, at, f"{entry}, " if mapping.value else entry
    first = mapping.value[0][0].start_mark
    at = first.index - first.column
    return at, at, " " * first.column + entry + "\n"


def _check(model_yaml: Path, text: str, changes: dict[str, int]) -> None:
    """The new text is a valid spec holding exactly the new values, or nothing is written."""
    try:
        data = yaml.safe_load(text)
        spec = parse_spec(data, ModelSpec, file=model_yaml, default_name=model_yaml.parent.name)
    except (yaml.YAMLError, SpecError) as e:
        raise TuneError(f"{model_yaml}: the tuned values would make it invalid, not written: {e}") from e
    assert isinstance(spec, ModelSpec)
    batching = spec.dynamic_batching
    found = {"instance_count": spec.instance_count, "max_batch_size": spec.max_batch_size,
             "max_queue_delay_microseconds": batching.max_queue_delay_microseconds if batching else None}
    wrong = {k: found[k] for k, v in changes.items() if found[k] != v}
    if wrong:
        raise TuneError(f"{model_yaml}: writing the tuned values went wrong ({wrong}), not written")
