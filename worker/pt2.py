"""Load a ``torch.export`` archive (``.pt2``) without unpickling or running anything it carries.

``torch.export.load`` unpickles: payloads marked ``use_pickle`` and legacy ``.pt``
weight files (``weights_only=False``), custom and opaque object constants, and the
archive's sample inputs every time. The graph JSON it then trusts carries Python too:
guard code it ``exec``\\s, symbolic-shape strings it ``sympify``\\s (``eval``), input
names it pastes into generated source, operator names it resolves with ``getattr``
on the ``torch`` module. This loader takes bytes the caller has already verified and
accepts only what a plain exported program needs:

- **members**: the format and version markers, one ``models/<name>.json``, its weights
  and constants configs and raw ``weight_<n>`` / ``tensor_<n>`` payloads, all stored
  uncompressed. The sample-inputs file may be present (torch always writes one) but is
  never read. Anything else (legacy ``.pt`` files, custom or opaque objects, compiled
  code, extra files) is refused.
- **payloads**: raw little-endian bytes, never ``use_pickle``; each tensor is
  ``torch.frombuffer`` + ``as_strided`` from its metadata, its dtype from an allow-list,
  its view checked to lie inside its payload.
- **graph**: every text field must pass the rule for its key (names are identifiers,
  symbolic expressions use sympy constructors only, operators are ``aten`` operators
  that take no file name, or the symbolic-int ones); no guard code; tensor inputs
  only. Then torch's ``ExportedProgramDeserializer`` builds the program, with no
  sample inputs.

What stays trusted is torch's own code: a program can call the allowed ``aten``
operators (compute and memory, with the worker's privileges), nothing else.
torch is imported on first use, so the worker imports this module without it.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from protocol.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram

MAX_MEMBERS = 10_000
WEIGHTS, CONSTANTS = "weights", "constants"
_PAYLOAD_PREFIX = {WEIGHTS: "weight_", CONSTANTS: "tensor_"}
_MARKERS = {"archive_format": "pt2", "archive_version": "0", "byteorder": "little"}
_REQUIRED_MARKERS = ("archive_format", "archive_version")  # torch writes both; old archives lack byteorder
_OPTIONAL = {".data/version", ".data/serialization_id"}  # torch's own bookkeeping, never read
# torch._export.serde.schema.ScalarType → torch dtype name: plain numeric types only.
DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32",
          8: "float64", 12: "bool", 13: "bfloat16"}
STRIDED = 7  # schema.Layout.Strided
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+))*")
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
_PAYLOAD = re.compile(r"data/(weights/weight|constants/tensor)_[0-9]+")
# Symbolic shapes arrive as sympy source, e.g. "Mul(Integer(128), Symbol('s77', positive=True))".
_SYM_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                        r"|'(?:[A-Za-z_][A-Za-z0-9_]*|[0-9][0-9.eE+-]*)'"
                        r"|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|[-+*/%(),=<>!&|~^])")
_SYM_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]+")
_SYM_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
    "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "true", "false", "True", "False", "oo", "int_oo", "IntInfinity", "NegativeIntInfinity",
    # torch.utils._sympy.functions, as the deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
    # assumption keywords of Symbol(...)
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "commutative",
    "evaluate",
})
_TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}
_INPUT_KINDS = {"user_input", "parameter", "buffer", "tensor_constant"}
_OUTPUT_KINDS = {"user_output", "buffer_mutation"}
# torch's graph deserializer keeps its state in a module global: one deserialization at a time.
_DESERIALIZING = threading.Lock()


class ArchiveRefused(ConfigError):
    """The archive holds something this loader will not read: pickle, code, unknown members."""


def load_program(data: bytes) -> ExportedProgram:
    """The exported program in ``data`` (a ``.pt2`` archive), built without pickle or ``exec`` of its text.

    Raises :class:`ArchiveRefused` for anything outside the accepted subset; torch's own
    errors for a program it cannot build propagate.
    """
    archive = _Archive.open(data)
    with archive.zip:
        doc = _checked_graph(archive)
        state_dict = _payloads(archive, WEIGHTS)
        constants = _payloads(archive, CONSTANTS)
    return _deserialize(doc, state_dict, constants)


def _refuse(what: str, value: object = None) -> ArchiveRefused:
    # Archive text reaches logs and the heartbeat: escaped and cut short.
    return ArchiveRefused(what if value is None else f"{what}: {ascii(value)[:80]}")


# ---- the zip archive -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Archive:
    """An opened archive whose member list has been checked; names are relative to its root."""

    zip: zipfile.ZipFile
    root: str
    model: str

    @classmethod
    def open(cls, data: bytes) -> _Archive:
        """Open ``data`` and check every member against what a plain program has."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
            raise _refuse("not a zip archive") from e
        infos = archive.infolist()
        root = _root(infos)
        names = [i.filename[len(root) + 1:] for i in infos]
        models = [n for n in names if n.startswith("models/")]
        if len(models) != 1 or not re.fullmatch(r"models/[A-Za-z0-9_]+\.json", models[0]):
            raise _refuse("expected exactly one models/<name>.json", models)
        opened = cls(archive, root, models[0].removeprefix("models/").removesuffix(".json"))
        opened._check_members(names)
        opened._check_markers(names)
        return opened

    def read(self, name: str) -> bytes:
        """The bytes of one member (CRC-checked by zipfile)."""
        return self.zip.read(f"{self.root}/{name}")

    def _check_members(self, names: list[str]) -> None:
        expected = {f"models/{self.model}.json", f"data/weights/{self.model}_weights_config.json",
                    f"data/constants/{self.model}_constants_config.json",
                    f"data/sample_inputs/{self.model}.pt", *_MARKERS, *_OPTIONAL}
        for name in names:
            if name not in expected and not _PAYLOAD.fullmatch(name):
                raise _refuse("unexpected archive member", name)

    def _check_markers(self, names: list[str]) -> None:
        if not all(name in names for name in _REQUIRED_MARKERS):
            raise _refuse("archive has no format or version marker")
        for name, value in _MARKERS.items():
            if name in names and self.read(name).decode("ascii", "replace").strip() != value:
                raise _refuse(f"{name} is not {value!r}")
        if sys.byteorder != "little":
            raise _refuse("raw payloads are little-endian; this host is not")


def _root(infos: list[zipfile.ZipInfo]) -> str:
    """The one top-level folder every member sits in; members must be stored, unencrypted, unique."""
    if not infos or len(infos) > MAX_MEMBERS:
        raise _refuse("empty archive or too many members", len(infos))
    root = infos[0].filename.split("/", 1)[0]
    if len({i.filename for i in infos}) != len(infos):
        raise _refuse("duplicate archive members")
    for info in infos:
        # Stored members cost no more than their size in the archive: no decompression bombs.
        if (not info.filename.startswith(f"{root}/") or info.compress_type != zipfile.ZIP_STORED
                or info.flag_bits & 0x1 or info.file_size != info.compress_size):
            raise _refuse("member not stored plainly under one root", info.filename)
    return root


def _json(archive: _Archive, name: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except KeyError as e:
        raise _refuse("missing archive member", name) from e
    except (ValueError, RecursionError) as e:
        raise _refuse("malformed JSON member", name) from e


# ---- payloads: weights and constants ---------------------------------------------------------

@dataclass(frozen=True)
class _Payload:
    """One tensor's place in a raw payload file, as its config entry describes it."""

    path: str
    dtype: str
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    is_param: bool
    requires_grad: bool

    @classmethod
    def parse(cls, kind: str, fqn: str, entry: dict[str, Any]) -> _Payload:
        """Check one config entry: raw (never pickled), a tensor of an allowed dtype, on the CPU."""
        if entry.get("use_pickle") is not False:
            raise _refuse(f"{kind} entry is pickled", fqn)
        path, meta = entry.get("path_name"), entry.get("tensor_meta")
        if not isinstance(path, str) or not re.fullmatch(f"{_PAYLOAD_PREFIX[kind]}[0-9]+", path):
            raise _refuse(f"{kind} entry is not a raw tensor payload", path)
        if not isinstance(meta, dict) or meta.get("dtype") not in DTYPES or meta.get("layout") != STRIDED:
            raise _refuse(f"{kind} entry has a dtype or layout we do not load", fqn)
        if meta.get("device") != {"type": "cpu", "index": None}:
            raise _refuse(f"{kind} entry is not a CPU tensor", fqn)
        sizes, strides = _ints(meta.get("sizes")), _ints(meta.get("strides"))
        (offset,) = _ints([meta.get("storage_offset")])
        if len(sizes) != len(strides):
            raise _refuse(f"{kind} entry has mismatched sizes and strides", fqn)
        return cls(path, DTYPES[meta["dtype"]], sizes, strides, offset, entry.get("is_param") is True,
                   meta.get("requires_grad") is True)

    def elements_needed(self) -> int:
        """How many elements of the payload the strided view reaches (0 for an empty tensor)."""
        if 0 in self.sizes:
            return 0
        return self.offset + 1 + sum((n - 1) * s for n, s in zip(self.sizes, self.strides, strict=True))


def _ints(values: object) -> tuple[int, ...]:
    """Concrete non-negative ints from ``[{"as_int": n}, …]``; symbolic sizes are refused."""
    if not isinstance(values, list):
        raise _refuse("tensor metadata is not a list")
    out = []
    for v in values:
        n = v.get("as_int") if isinstance(v, dict) else None
        if type(n) is not int or n < 0:
            raise _refuse("tensor metadata is not a non-negative integer", v)
        out.append(n)
    return tuple(out)


def _payloads(archive: _Archive, kind: str) -> dict[str, torch.Tensor]:
    """fqn → tensor for the weights or the constants; tensors sharing a payload share its memory."""
    config = _json(archive, f"data/{kind}/{archive.model}_{kind}_config.json")
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(f"{kind} config has no config mapping")
    flats: dict[str, torch.Tensor] = {}
    tensors = {}
    for fqn, entry in entries.items():
        if not _DOTTED.fullmatch(fqn):
            raise _refuse(f"{kind} name is not a dotted identifier", fqn)
        payload = _Payload.parse(kind, fqn, entry if isinstance(entry, dict) else {})
        if payload.path not in flats:
            flats[payload.path] = _flat(archive, f"data/{kind}/{payload.path}", payload.dtype)
        tensors[fqn] = _view(flats[payload.path], payload, fqn)
    return tensors


def _flat(archive: _Archive, name: str, dtype_name: str) -> torch.Tensor:
    """A payload's bytes as a 1-D tensor that owns a writable copy of them."""
    import torch

    dtype = getattr(torch, dtype_name)
    try:
        buffer = bytearray(archive.read(name))
    except KeyError as e:
        raise _refuse("missing payload", name) from e
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(buffer) % itemsize:
        raise _refuse(f"payload size is not a multiple of {dtype_name}", name)
    if not buffer:
        return torch.empty(0, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=dtype)
    if dtype is torch.bool and int(flat.view(torch.uint8).max()) > 1:
        raise _refuse("bool payload holds values other than 0 and 1", name)
    return flat


def _view(flat: torch.Tensor, payload: _Payload, fqn: str) -> torch.Tensor:
    import torch

    if str(flat.dtype).removeprefix("torch.") != payload.dtype:
        raise _refuse("entries sharing a payload disagree on its dtype", fqn)
    if payload.elements_needed() > flat.numel():
        raise _refuse("tensor reaches past the end of its payload", fqn)
    view = torch.as_strided(flat, payload.sizes, payload.strides, payload.offset)
    return torch.nn.Parameter(view, requires_grad=payload.requires_grad) if payload.is_param else view


# ---- the graph JSON --------------------------------------------------------------------------

def _checked_graph(archive: _Archive) -> dict[str, Any]:
    doc = _json(archive, f"models/{archive.model}.json")
    if not isinstance(doc, dict):
        raise _refuse("program JSON is not an object")
    try:
        _check_text(doc, "")
        _check_shape(doc)
    except RecursionError as e:
        raise _refuse("program JSON nests too deeply") from e
    except (KeyError, TypeError, AttributeError) as e:
        raise _refuse("program JSON is malformed", str(e)) from e
    return doc


def _check_text(value: object, key: str) -> None:
    """Every dict key is an identifier and every string passes the rule for the key it sits under.

    Strings in a list take the rule of the list's key. A text field with no rule is
    refused: a field torch adds later fails closed instead of reaching ``exec``.
    """
    if isinstance(value, dict):
        if key == "metadata":
            _check_metadata(value)
            return
        for k, v in value.items():
            if not _IDENT.fullmatch(k):
                raise _refuse("program JSON key is not an identifier", k)
            _check_text(v, k)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, key)
    elif isinstance(value, str):
        rule = _TEXT_RULES.get(key)
        if rule is None or not rule(value):
            raise _refuse(f"program JSON text under {key!r} is not allowed", value)


def _check_metadata(metadata: dict[str, Any]) -> None:
    """Node metadata (stack traces, module paths) is free text that torch keeps but never runs."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _refuse("node metadata is not text")


def _check_shape(doc: dict[str, Any]) -> None:
    """No guard code, no custom objects, tensor inputs only, known input and output kinds."""
    module = doc["graph_module"]
    graph, signature = module["graph"], module["signature"]
    if doc.get("guards_code") or graph.get("custom_obj_values") or module.get("treespec_namedtuple_fields"):
        raise _refuse("program carries guard code, custom objects or named tuples")
    if any(set(arg) != {"as_tensor"} for arg in graph["inputs"]):
        raise _refuse("program inputs must all be tensors")
    kinds = ((signature["input_specs"], _INPUT_KINDS), (signature["output_specs"], _OUTPUT_KINDS))
    for specs, allowed in kinds:
        if any(len(spec) != 1 or not set(spec) <= allowed for spec in specs):
            raise _refuse("program has an input or output kind we do not load")


def _safe_sym_expr(text: str) -> bool:
    """Sympy source made only of known constructors, symbol names, numbers and operators.

    ``sympify`` evaluates its input as Python; with no attribute access, no subscripts,
    no lambdas and only these names, what it can evaluate is arithmetic on sympy objects.
    """
    text, pos = text.strip(), 0
    while pos < len(text) <= 4096:
        token = _SYM_TOKEN.match(text, pos)
        if token is None:
            return False
        name = token.group("name")
        if name and name not in _SYM_NAMES and not _SYM_SYMBOL.fullmatch(name):
            return False
        pos = token.end()
    return pos == len(text)


def _safe_treespec(text: str) -> bool:
    """A pytree spec ``[1, {...}]`` of tuples, lists and dicts with identifier keys only."""
    try:
        version, spec = json.loads(text)
        return version == 1 and _safe_spec_node(spec)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return False


def _safe_spec_node(node: dict[str, Any]) -> bool:
    kind, context = node["type"], node["context"]
    if kind not in _TREESPEC_TYPES:
        return False
    if kind == "builtins.dict":
        keys = json.loads(context)
        if not (isinstance(keys, list) and all(isinstance(k, str) and _IDENT.fullmatch(k) for k in keys)):
            return False
    elif context not in (None, "null"):
        return False
    return all(_safe_spec_node(child) for child in node["children_spec"])


def _allowed_target(target: str) -> bool:
    """An ``aten`` operator that takes no file name, or one of the symbolic-int operators."""
    return target in _sym_op_names() or _aten_op_ok(target)


@cache
def _sym_op_names() -> frozenset[str]:
    from torch._export.serde.serialize import _SYM_OPS

    return frozenset(f"{op.__module__}.{op.__name__}" for op in _SYM_OPS)


@cache
def _aten_op_ok(target: str) -> bool:
    import torch

    match = _ATEN.fullmatch(target)
    if not match:
        return False
    try:
        packet = getattr(torch.ops.aten, match.group(1))
        op = getattr(packet, match.group(2)) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    except (AttributeError, RuntimeError):  # no such operator or overload
        return False
    # aten::from_file and aten::save read and write files named by a string argument.
    return isinstance(op, torch._ops.OpOverload) and all(a.name != "filename" for a in op._schema.arguments)


_TEXT_RULES: dict[str, Callable[[str], object]] = {
    "name": _IDENT.fullmatch, "as_name": _IDENT.fullmatch, "forward_arg_names": _IDENT.fullmatch,
    "verifiers": _IDENT.fullmatch, "parameter_name": _DOTTED.fullmatch, "buffer_name": _DOTTED.fullmatch,
    "tensor_constant_name": _DOTTED.fullmatch, "fqn": lambda s: s == "" or bool(_DOTTED.fullmatch(s)),
    "expr_str": _safe_sym_expr, "in_spec": _safe_treespec, "out_spec": _safe_treespec,
    "target": _allowed_target, "type": re.compile(r"[a-z]+").fullmatch,
    "as_float": lambda s: s in ("Infinity", "-Infinity", "NaN"),
    "as_floats": lambda s: s in ("Infinity", "-Infinity", "NaN"),
    # Passed to operators as values and printed with repr() in generated code: inert text.
    "as_string": lambda s: len(s) <= 1024, "as_strings": lambda s: len(s) <= 1024,
    "torch_version": lambda s: len(s) <= 64,
}


def _deserialize(doc: dict[str, Any], state_dict: dict[str, torch.Tensor],
                 constants: dict[str, torch.Tensor]) -> ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    program = _dict_to_dataclass(schema.ExportedProgram, doc)
    with _DESERIALIZING:
        # No example inputs: torch would unpickle them, and serving never needs them.
        return ExportedProgramDeserializer().deserialize(program, state_dict, constants, None)
