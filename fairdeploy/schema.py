"""The one configuration loader: frozen dataclasses are the schema, TOML tables and command-line flags are layers.

Every setting of fairdeploy is a field of a frozen dataclass, with its default written once, on the field. A
configuration is built by `build(cls, layers)`: the defaults, then each `Layer` in turn (a profile file, a
calibration recipe, a pipeline table, the command line), each one a nested mapping whose keys are field names:

- a field whose type is itself a dataclass is a sub-table, recursed into (`[tensorrt]` in a profile, or
  `[export.tensorrt]` in a pipeline file, is the `tensorrt` field of ExportOptions); an optional one
  (`LatencyConfig | None`) is also switched off by `false` and on, with its defaults, by `true`;
- a key that is no field is an error naming the valid keys, and the table it sat in;
- a value is checked against the field's annotation (`check_type`): the error names the key, the file or flag it
  came from, the expected type and the value;
- `None` means "not given" (a command-line flag defaults to None, so it overrides only when typed);
- a field's `metadata` may carry `convert` (a function applied to the raw value before the type check, e.g.
  "fp16,int8" -> a tuple) and `internal = True` (set by code, never from a file or flag).

`build` returns the object and, for `Provenance`, which layer set each field, so a range check run after the merge
can still say where the offending value was written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, TypeVar

from fairdeploy.errors import FairdeployError

T = TypeVar("T")


def read_toml(path: Any) -> dict[str, Any]:
    """A TOML file (a Path or an importlib Traversable) as a table; one line naming the file when it is missing,
    unreadable or not TOML."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FairdeployError(f"{path}: not valid TOML ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FairdeployError(f"{path}: cannot be read ({exc})") from exc


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            convert: Callable[[Any], Any] | None = None, internal: bool = False) -> Any:
    """A dataclass field with loader metadata: `convert` the raw TOML/flag value first; `internal`: not a key."""
    meta = {"convert": convert, "internal": internal}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Layer:
    """One source of settings: `values` nested like the dataclass tree (None = not given).

    `source` names the file or "command line"; `table` is the TOML table the values sit in (a pipeline's
    "export"), "" for a file's top level; `names` maps a dotted field path to what the user typed instead of the
    field name (a command-line flag: {"tensorrt.max_batch": "--max-batch"})."""

    values: Mapping[str, Any]
    source: str
    table: str = ""
    names: Mapping[str, str] = field(default_factory=dict)

    def label(self, path: str) -> str:
        """How the user wrote `path` here: "--max-batch", or "p.toml: [export.tensorrt] max_batch"."""
        if path in self.names:
            return self.names[path]
        *tables, key = _split(self.table, path)
        where = f"[{'.'.join(tables)}] " if tables else ""
        return f"{self.source}: {where}{key}"


def _split(table: str, path: str) -> list[str]:
    return [*(table.split(".") if table else []), *(path.split(".") if path else [])]


@dataclass(frozen=True)
class Provenance:
    """Which layer set each dotted field path (the defaults set the rest)."""

    set_by: Mapping[str, Layer]

    def __call__(self, path: str) -> str:
        """Where the value at `path` came from, in the user's words ("--opt-level", "w.toml: [tensorrt] ...")."""
        layer = self.set_by.get(path)
        return layer.label(path) if layer is not None else f"{path} (default)"

    def given(self, path: str, sources: Iterable[str] | None = None) -> bool:
        """Whether any layer (or one of `sources`) set `path`."""
        layer = self.set_by.get(path)
        return layer is not None and (sources is None or layer.source in set(sources))


def flag_layer(flags: Mapping[str, tuple[str, Any]], source: str = "command line") -> Layer:
    """The command line as a layer: `flags` maps a dotted field path to (the flag as typed, its value); a value None
    was not given. A message about a value names its flag."""
    values: dict[str, Any] = {}
    for path, (_, value) in flags.items():
        if value is None:
            continue
        *tables, key = path.split(".")
        node = values
        for table in tables:
            node = node.setdefault(table, {})
        node[key] = value
    return Layer(values, source, names={path: flag for path, (flag, _) in flags.items()})


def keys(cls: type) -> list[str]:
    """The TOML keys of `cls`: its fields, internal ones left out."""
    return [f.name for f in fields(cls) if not f.metadata.get("internal")]


def build(cls: type[T], layers: Iterable[Layer], base: T | None = None) -> tuple[T, Provenance]:
    """`base` (default: cls()) with every layer applied in turn; see the module docstring."""
    obj = base if base is not None else cls()
    set_by: dict[str, Layer] = {}
    for layer in layers:
        obj = _apply(obj, layer.values, layer, "", set_by)
    return obj, Provenance(set_by)


def load(cls: type[T], values: Mapping[str, Any], source: str, table: str = "", base: T | None = None) -> T:
    """`build` from one TOML table (or a dict of options)."""
    return build(cls, [Layer(values, source, table)], base)[0]


def _apply(obj: Any, values: Mapping[str, Any], layer: Layer, prefix: str, set_by: dict[str, Layer]) -> Any:
    cls = type(obj)
    by_name = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    hints = _hints(cls)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in by_name:
            tables = _split(layer.table, prefix.rstrip(".")) if (layer.table or prefix) else []
            where = f" in [{'.'.join(tables)}]" if tables else ""
            raise FairdeployError(f"{layer.source}: unknown key {key!r}{where}; valid keys: {', '.join(by_name)}")
        if value is None:
            continue
        f = by_name[key]
        hint = hints.get(key, Any)
        sub = _dataclass_arm(hint)
        if sub is not None and isinstance(value, Mapping):
            current = getattr(obj, key)
            changes[key] = _apply(current if isinstance(current, sub) else sub(), value, layer, f"{path}.", set_by)
            continue
        if sub is not None and isinstance(value, bool) and _optional(hint):
            # `latency = false` switches an optional sub-table off, `true` on (with its defaults)
            current = getattr(obj, key)
            changes[key] = (current if isinstance(current, sub) else sub()) if value else None
            set_by[path] = layer
            continue
        if sub is not None and is_dataclass(value):
            changes[key] = value  # built by code (a test, or the CLI handing on an object)
            set_by[path] = layer
            continue
        convert = f.metadata.get("convert")
        try:
            if convert is not None:
                value = convert(value)
        except FairdeployError as exc:
            raise FairdeployError(f"{layer.label(path)}: {exc}") from None
        changes[key] = check_type(value, hint, layer.label(path))
        set_by[path] = layer
    return replace(obj, **changes) if changes else obj


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  # pragma: no cover - an unresolvable annotation: no check, not a crash
        return {}


def _dataclass_arm(hint: Any) -> type | None:
    """The dataclass in `hint` (`Sub` or `Sub | None`), if any: such a field is a sub-table."""
    if isinstance(hint, type) and is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if isinstance(a, type) and is_dataclass(a)]
        return arms[0] if len(arms) == 1 else None
    return None


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


# ---- type checks of single values (TOML gives bool, int, float, str, list, table) ----

class _Mismatch(Exception):
    pass


def check_type(value: Any, hint: Any, what: str) -> Any:
    """`value` checked against the type `hint`; returns it converted (list -> tuple where the field is a tuple,
    int -> float where it is a float) or raises FairdeployError "WHAT must be EXPECTED, got VALUE (TYPE)"."""
    try:
        return _conform(value, hint)
    except _Mismatch:
        raise FairdeployError(f"{what} must be {describe_type(hint)}, got {value!r} "
                              f"({_toml_type(value)})") from None


_TOML_TYPES = ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "a string"),
               ((list, tuple), "a list"), (dict, "a table"))


def _toml_type(value: Any) -> str:
    return next((name for t, name in _TOML_TYPES if isinstance(value, t)), type(value).__name__)


def _conform(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _conform(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            items = [_conform(v, a) for v, a in zip(value, args)]
        else:
            items = [_conform(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    target = origin or hint
    if isinstance(target, type) and not isinstance(value, target):
        raise _Mismatch
    return value


def describe_type(hint: Any) -> str:
    """'an integer', 'a number', 'a list of integers', 'a string or none', "one of 'a', 'b'"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(arms)
    if origin is typing.Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(repr(a) for a in args)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
              type(None): "none", Any: "any value"}
    if hint in simple:
        return simple[hint]
    if origin in (tuple, list) or hint in (tuple, list):
        if args and (origin is list or args[-1] is Ellipsis):
            inner = describe_type(args[0])
            plural = {"an integer": "integers", "a number": "numbers", "a string": "strings",
                      "true or false": "true/false values"}.get(inner, inner)
            return f"a list of {plural}"
        if args:
            return f"a list of {len(args)} ({', '.join(describe_type(a) for a in args)})"
        return "a list"
    if origin is dict:
        return "a table"
    if isinstance(hint, type) and is_dataclass(hint):
        return "a table"
    return getattr(hint, "__name__", str(hint))
