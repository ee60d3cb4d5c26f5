"""Config files: a YAML mapping of config fields, read with PyYAML's safe loader, refusing a key
given twice (YAML says keys are unique, yet PyYAML keeps the last one silently)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class DuplicateKeyError(Exception):
    """A key given twice in one YAML mapping; the message names it and both lines."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML says keys are
    unique, yet PyYAML keeps the last one silently: ``lr: 0.1`` then ``lr: 0.2`` would train
    with 0.2 and no word). In the top mapping, ``batch-size`` and ``batch_size`` name the same
    field and count as one key. Merge keys (``<<: *base``) may still be overridden. A nested
    key is named by its path (``model_args.width``)."""

    _top: yaml.Node | None = None

    def get_single_node(self) -> yaml.Node | None:
        self._top = super().get_single_node()
        self._paths: dict[yaml.Node, str] = {}  # a nested mapping's node -> "parent.key."
        return self._top

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, tuple[str, int]] = {}
        prefix = self._paths.get(node, "")
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # the base class refuses it in its own words
                continue
            shown = f"{prefix}{key}"
            self._paths.setdefault(value_node, f"{shown}.")
            if node is self._top and isinstance(key, str):
                key = key.replace("-", "_")
            line = key_node.start_mark.line + 1
            if key in seen:
                first, at = seen[key]
                what = (f"key {shown!r} is given twice" if first == shown else
                        f"keys {first!r} and {shown!r} name the same field")
                raise DuplicateKeyError(f"{what} (lines {at} and {line})")
            seen[key] = (shown, line)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (dashes in keys are accepted as underscores); a
    key given twice is refused with both its lines."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config: no such file {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as err:
        raise UserError(f"config: {p}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config: {p}{where} is not valid YAML") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"config: cannot read {p}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config: {p} must hold a mapping of fields, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
