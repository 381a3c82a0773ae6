"""Reading GGUF headers and writing a copy of a GGUF file with extra metadata.

The calibration tool stores TriAttention's statistics as ``triattention.*`` metadata keys
in a copy of the model (docs/calibration-format.md). :func:`write_with_metadata` makes
that copy without loading the model: it parses the header, keeps every original key
(in order, byte for byte) and every tensor info, appends the new keys, re-pads the start
of the data section to the file's alignment and streams the tensor data across
unchanged. The output appears at its destination only when it is complete.

    from pytriatt.gguf_io import read_header, write_with_metadata

    hdr = read_header("model.gguf")          # validated header: keys, tensor infos, offsets
    hdr.get("general.architecture")          # 'llama'
    res = write_with_metadata("model.gguf", "model.tri.gguf", cal.gguf_fields())
    res["replaced"]                          # True if the input already had triattention.* keys

GGUF layout (versions 2 and 3, little-endian): ``"GGUF"``, uint32 version, uint64 tensor
count, uint64 key/value count, the key/value pairs, the tensor infos (name, dims, ggml
type, data offset), zero padding to ``general.alignment`` (default 32), the tensor data.
Tensor offsets are relative to the start of the data section, so changing the metadata
only moves that start.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import secrets
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

__all__ = ["GGUFHeader", "KeyValue", "printable", "TensorInfo", "read_header", "write_with_metadata", "encode_value",
           "DEFAULT_ALIGNMENT", "COPY_CHUNK", "type_name", "ggml_type_name", "read_string_array_bytes"]

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
COPY_CHUNK = 16 << 20  # bytes per read/write when copying the tensor data
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8

# gguf_type (gguf.h)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, \
    T_UINT64, T_INT64, T_FLOAT64 = range(13)
INT_TYPES = (T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_UINT64, T_INT64)
FLOAT_TYPES = (T_FLOAT32, T_FLOAT64)

_NUMPY_OF = {
    T_UINT8: np.dtype("<u1"), T_INT8: np.dtype("<i1"), T_UINT16: np.dtype("<u2"), T_INT16: np.dtype("<i2"),
    T_UINT32: np.dtype("<u4"), T_INT32: np.dtype("<i4"), T_FLOAT32: np.dtype("<f4"), T_BOOL: np.dtype("<u1"),
    T_UINT64: np.dtype("<u8"), T_INT64: np.dtype("<i8"), T_FLOAT64: np.dtype("<f8"),
}
_STRUCT_OF = {T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
              T_FLOAT32: "<f", T_BOOL: "<B", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d"}
_TYPE_NAMES = {T_UINT8: "uint8", T_INT8: "int8", T_UINT16: "uint16", T_INT16: "int16", T_UINT32: "uint32",
               T_INT32: "int32", T_FLOAT32: "float32", T_BOOL: "bool", T_STRING: "string", T_ARRAY: "array",
               T_UINT64: "uint64", T_INT64: "int64", T_FLOAT64: "float64"}
# numpy kind + itemsize -> GGUF type ("f4" -> float32, ...)
_TYPE_OF_NUMPY = {v.kind + str(v.itemsize): k for k, v in _NUMPY_OF.items() if k != T_BOOL}

# the GGUF types of the calibration keys (docs/calibration-format.md); other keys are inferred
_FIXED_TYPES: Dict[str, Tuple[int, Optional[int]]] = {
    "triattention.version": (T_UINT32, None),
    "triattention.n_layer": (T_UINT32, None),
    "triattention.n_head": (T_UINT32, None),
    "triattention.n_freq": (T_UINT32, None),
    "triattention.q_mean_real": (T_ARRAY, T_FLOAT32),
    "triattention.q_mean_imag": (T_ARRAY, T_FLOAT32),
    "triattention.q_abs_mean": (T_ARRAY, T_FLOAT32),
    "triattention.calib_tokens": (T_UINT64, None),
    "triattention.calib_source": (T_STRING, None),
    "triattention.model_fingerprint": (T_STRING, None),
}


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def printable(s: str) -> bool:
    """No control character (C0, DEL, C1) and no undecodable byte (read as U+FFFD): a metadata value that
    can be quoted in a one-line message. cpp/llama-triatt-calib.cpp (triatt_printable) applies the same
    test to the bytes."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\ufffd" for c in s)


@dataclasses.dataclass
class KeyValue:
    """One metadata pair: its key, GGUF type, decoded value and byte range [start, end) in the file."""

    key: str
    type: int
    value: Any
    start: int
    end: int
    item_type: Optional[int] = None  # element type of an array

    @property
    def type_name(self) -> str:
        if self.type == T_ARRAY:
            return f"array[{_TYPE_NAMES.get(self.item_type, '?')}]"
        return _TYPE_NAMES.get(self.type, "?")


@dataclasses.dataclass
class TensorInfo:
    """One tensor info: name, ggml dims (ne0 first), ggml type, offset in the data section, size."""

    name: str
    shape: Tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: Optional[int]  # None for a ggml type this gguf package does not know
    start: int
    end: int


@dataclasses.dataclass
class GGUFHeader:
    """A parsed, validated GGUF header (no tensor data is read)."""

    path: Path
    version: int
    kv: List[KeyValue]
    tensors: List[TensorInfo]
    alignment: int
    kv_start: int  # first byte of the key/value pairs
    tensor_info_start: int  # first byte of the tensor infos
    header_end: int  # end of the tensor infos
    data_offset: int  # start of the data section (header_end padded to alignment)
    data_end: int  # end of the last tensor's data (absolute)
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        for kv in self.kv:
            if kv.key == key:
                return kv.value
        return default

    def __contains__(self, key: str) -> bool:
        return any(kv.key == key for kv in self.kv)

    def keys(self) -> List[str]:
        return [kv.key for kv in self.kv]

    @property
    def tensor_data_bytes(self) -> int:
        """Bytes of the data section (from its aligned start to the end of the file)."""
        return max(0, self.file_size - self.data_offset)


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def take(self, n: int) -> int:
        """Advance by n bytes; return the old position."""
        if n < 0 or self.pos + n > self.size:
            raise _Truncated()
        p = self.pos
        self.pos += n
        return p

    def unpack(self, fmt: str):
        s = struct.Struct(fmt)
        p = self.take(s.size)
        return s.unpack_from(self.buf, p)

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def u64(self) -> int:
        return self.unpack("<Q")[0]

    def string(self) -> str:
        n = self.u64()
        p = self.take(n)
        return bytes(self.buf[p:p + n]).decode("utf-8", errors="replace")


def _corrupt(path, why: str) -> ValueError:
    return ValueError(f"{path}: corrupt GGUF file ({why}); re-download or re-create it")


def _read_value(cur: _Cursor, vtype: int, path, depth: int = 0):
    """Decode one value of type vtype; returns (value, item_type)."""
    if vtype in _NUMPY_OF:
        v = cur.unpack(_STRUCT_OF[vtype])[0]
        return (bool(v) if vtype == T_BOOL else v), None
    if vtype == T_STRING:
        return cur.string(), None
    if vtype == T_ARRAY:
        if depth >= _MAX_NESTING:
            raise _corrupt(path, "arrays nested too deeply")
        itype = cur.u32()
        n = cur.u64()
        if itype in _NUMPY_OF:
            dt = _NUMPY_OF[itype]
            if n > cur.size:  # cheap sanity bound before multiplying
                raise _Truncated()
            p = cur.take(n * dt.itemsize)
            arr = np.frombuffer(cur.buf, dtype=dt, count=n, offset=p).copy()
            return (arr.astype(bool) if itype == T_BOOL else arr), itype
        if itype == T_STRING:
            if n > cur.size // 8:  # each string needs at least its 8-byte length
                raise _Truncated()
            return [cur.string() for _ in range(n)], itype
        if itype == T_ARRAY:
            if n > cur.size // 12:
                raise _Truncated()
            return [_read_value(cur, T_ARRAY, path, depth + 1)[0] for _ in range(n)], itype
        raise _corrupt(path, f"unknown array element type {itype}")
    raise _corrupt(path, f"unknown value type {vtype}")


def _ggml_nbytes(ggml_type: int, shape: Tuple[int, ...]) -> Optional[int]:
    try:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ImportError, ValueError, KeyError):
        return None
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block:
        return None
    return n // block * size


def _check_src_path(path: Path) -> None:
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not path.exists():
        raise FileNotFoundError(f"{path} is a broken symbolic link")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the path of a .gguf file")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file; give the path of a .gguf file")


def has_prefix(path: PathLike, prefix: str) -> bool:
    """Whether the GGUF at ``path`` has a metadata key starting with ``prefix``."""
    return any(k.startswith(prefix) for k in read_header(path).keys())


def read_header(path: PathLike) -> GGUFHeader:
    """Parse and validate the header of a GGUF file (metadata and tensor infos; no tensor data).

    Raises FileNotFoundError for a missing file and ValueError, with a message that says
    what is wrong, for a directory, a file that is not GGUF, an unsupported GGUF version,
    a truncated file (header or tensor data cut short) or a corrupt header.
    """
    path = Path(path)
    _check_src_path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(24)
        if head[:4] != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        if len(head) < 24:
            raise ValueError(f"{path} is truncated ({size} bytes, shorter than a GGUF header); "
                             f"re-download or re-create it")
        version = struct.unpack_from("<I", head, 4)[0]
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack_from(">I", head, 4)[0] in SUPPORTED_VERSIONS:
                raise ValueError(f"{path} is a big-endian GGUF file; only little-endian GGUF is supported "
                                 f"(convert it with llama.cpp's gguf tools)")
            raise ValueError(f"{path}: GGUF version {version} is not supported (expected 2 or 3); "
                             f"convert it with a current llama.cpp")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _parse(mm, size, version, path)
            except _Truncated:
                raise ValueError(f"{path} is truncated or corrupt: its header runs past the end of the "
                                 f"file ({size} bytes); re-download or re-create it") from None


def type_name(vtype: int) -> str:
    """The GGUF name of a value type: "uint32", "string", "array", ..."""
    return _TYPE_NAMES.get(vtype, "?")


def ggml_type_name(ggml_type: int) -> str:
    """The ggml name of a tensor type ("F32", "Q8_0"), or its number where the gguf package lacks it."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return str(ggml_type)


def read_string_array_bytes(header: GGUFHeader, key: str) -> List[bytes]:
    """The elements of a string array as stored, undecoded (read_header decodes strings, replacing invalid
    UTF-8; a hash over a vocabulary must see the bytes). Reads only that key/value pair's bytes."""
    kv = next((kv for kv in header.kv if kv.key == key), None)
    if kv is None or kv.type != T_ARRAY or kv.item_type != T_STRING:
        raise ValueError(f"{header.path}: {key} is not an array of strings")
    with open(header.path, "rb") as f:
        f.seek(kv.start)
        buf = f.read(kv.end - kv.start)
    cur = _Cursor(buf, len(buf))
    try:
        cur.take(cur.u64())          # the key
        cur.take(4 + 4)              # value type, element type
        out = []
        for _ in range(cur.u64()):
            n = cur.u64()
            p = cur.take(n)
            out.append(bytes(buf[p:p + n]))
    except _Truncated:
        raise ValueError(f"{header.path} changed while it was being read") from None
    return out


def _parse(mm, size: int, version: int, path: Path) -> GGUFHeader:
    cur = _Cursor(mm, size)
    cur.take(8)
    n_tensors, n_kv = cur.unpack("<QQ")
    if n_tensors > size or n_kv > size:
        raise _Truncated()
    kv_start = cur.pos
    kvs: List[KeyValue] = []
    seen = set()
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string()
        if key in seen:  # llama.cpp refuses such files; readers disagree on which value counts
            raise _corrupt(path, f"duplicate metadata key {key!r}")
        seen.add(key)
        vtype = cur.u32()
        value, itype = _read_value(cur, vtype, path)
        kvs.append(KeyValue(key, vtype, value, start, cur.pos, itype))
    tensor_info_start = cur.pos
    tensors: List[TensorInfo] = []
    for _ in range(n_tensors):
        start = cur.pos
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > _MAX_DIMS:
            raise _corrupt(path, f"tensor {name!r} has {n_dims} dimensions")
        shape = cur.unpack(f"<{n_dims}Q") if n_dims else ()
        ggml_type, offset = cur.unpack("<IQ")
        tensors.append(TensorInfo(name, tuple(int(d) for d in shape), int(ggml_type), int(offset),
                                  _ggml_nbytes(ggml_type, shape), start, cur.pos))
    header_end = cur.pos

    alignment = DEFAULT_ALIGNMENT
    for kv in kvs:
        if kv.key == "general.alignment":
            if kv.type != T_UINT32 or kv.value == 0 or kv.value & (kv.value - 1):
                raise _corrupt(path, f"general.alignment must be a power-of-two uint32, got {kv.value!r}")
            alignment = int(kv.value)
    data_offset = _align(header_end, alignment)
    data_end = data_offset
    for t in tensors:
        end = data_offset + t.offset + (t.nbytes or 0)
        data_end = max(data_end, end)
    if n_tensors and data_end > size:
        missing = data_end - size
        raise ValueError(f"{path} is truncated: its tensor data ends {missing} bytes past the end of the file "
                         f"({size} bytes); re-download or re-create it")
    return GGUFHeader(path, version, kvs, tensors, alignment, kv_start, tensor_info_start, header_end,
                      data_offset, data_end, size)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------------------
# encoding metadata
# ---------------------------------------------------------------------------


def _enc_string(s: Union[str, bytes]) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _int_type(v: int, key: str) -> int:
    if 0 <= v < 1 << 32:
        return T_UINT32
    if -(1 << 31) <= v < 0:
        return T_INT32
    if -(1 << 63) <= v < 1 << 63:
        return T_INT64
    if 0 <= v < 1 << 64:
        return T_UINT64
    raise ValueError(f"metadata {key}: integer {v} does not fit in 64 bits")


def _infer(value: Any, key: str) -> Tuple[int, Optional[int]]:
    if isinstance(value, (bool, np.bool_)):
        return T_BOOL, None
    if isinstance(value, (str, bytes)):
        return T_STRING, None
    if isinstance(value, np.generic) and value.dtype.kind in "iuf":
        t = _TYPE_OF_NUMPY.get(value.dtype.kind + str(value.dtype.itemsize))
        if t is None:
            raise ValueError(f"metadata {key}: numpy type {value.dtype} has no GGUF equivalent")
        return t, None
    if isinstance(value, int):
        return _int_type(value, key), None
    if isinstance(value, float):
        return T_FLOAT32, None
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"metadata {key}: arrays must be 1-d, got shape {value.shape} (ravel it)")
        if value.dtype.kind == "b":
            return T_ARRAY, T_BOOL
        if value.dtype.kind in "US":
            return T_ARRAY, T_STRING
        t = _TYPE_OF_NUMPY.get(value.dtype.kind + str(value.dtype.itemsize))
        if t is None:
            raise ValueError(f"metadata {key}: numpy type {value.dtype} has no GGUF equivalent")
        return T_ARRAY, t
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, bytes)) for v in value) and value:
            return T_ARRAY, T_STRING
        if all(isinstance(v, (bool, np.bool_)) for v in value) and value:
            return T_ARRAY, T_BOOL
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            lo, hi = (min(value), max(value)) if value else (0, 0)
            t = _int_type(int(lo), key)
            t2 = _int_type(int(hi), key)
            return T_ARRAY, (T_INT64 if T_INT64 in (t, t2) else t2 if t == T_UINT32 else t)
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            return T_ARRAY, T_FLOAT32
        raise ValueError(f"metadata {key}: a list must hold only strings, only bools or only numbers")
    raise ValueError(f"metadata {key}: cannot store a value of type {type(value).__name__} in GGUF")


def _enc_scalar(vtype: int, value: Any, key: str) -> bytes:
    if vtype == T_STRING:
        if not isinstance(value, (str, bytes)):
            raise ValueError(f"metadata {key}: expected a string, got {type(value).__name__}")
        return _enc_string(value)
    if vtype == T_BOOL:
        return struct.pack("<B", 1 if value else 0)
    dt = _NUMPY_OF[vtype]
    if dt.kind in "iu":
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise ValueError(f"metadata {key}: expected an integer, got {value!r}")
        v = int(value)
        info = np.iinfo(dt)
        if not info.min <= v <= info.max:
            raise ValueError(f"metadata {key}: {v} does not fit in {_TYPE_NAMES[vtype]}")
        return np.array(v, dtype=dt).tobytes()
    return np.array(float(value), dtype=dt).tobytes()


def encode_value(key: str, value: Any, vtype: Optional[int] = None, item_type: Optional[int] = None) -> bytes:
    """The bytes of one GGUF key/value pair.

    The ``triattention.*`` keys get the types of docs/calibration-format.md; other types
    are inferred (Python int -> uint32 when it fits, float -> float32, str -> string,
    numpy scalars and 1-d arrays by dtype, lists of numbers -> float32/int arrays).
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
    if vtype is None:
        vtype, item_type = _FIXED_TYPES.get(key) or _infer(value, key)
    out = _enc_string(key) + struct.pack("<I", vtype)
    if vtype != T_ARRAY:
        return out + _enc_scalar(vtype, value, key)
    if isinstance(value, (str, bytes)) or np.ndim(value) != 1:
        raise ValueError(f"metadata {key}: expected a 1-d array")
    n = len(value)
    out += struct.pack("<IQ", item_type, n)
    if item_type == T_STRING:
        return out + b"".join(_enc_string(v) for v in value)
    if item_type == T_BOOL:
        return out + np.asarray(value, dtype=bool).astype(np.uint8).tobytes()
    dt = _NUMPY_OF.get(item_type)
    if dt is None:
        raise ValueError(f"metadata {key}: unsupported array element type {item_type}")
    arr = np.asarray(value)
    if arr.dtype.kind == "c":
        raise ValueError(f"metadata {key}: complex arrays cannot be stored; store real and imaginary parts")
    if dt.kind in "iu" and arr.size:
        if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"metadata {key}: expected integers")
        info = np.iinfo(dt)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"metadata {key}: values do not fit in {_TYPE_NAMES[item_type]}")
    return out + np.ascontiguousarray(arr, dtype=dt).tobytes()


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def _copy_data(fsrc, fdst, offset: int, length: int, chunk: Optional[int] = None) -> None:
    """Stream ``length`` bytes of ``fsrc`` from ``offset`` into ``fdst`` (in chunks, never all at once)."""
    chunk = int(chunk or COPY_CHUNK)
    fsrc.seek(offset)
    buf = bytearray(min(chunk, max(length, 1)))
    view = memoryview(buf)
    left = length
    while left > 0:
        n = fsrc.readinto(view[:min(len(buf), left)])
        if not n:
            raise ValueError(f"{fsrc.name} became shorter while it was being copied "
                             f"({left} bytes missing); is another program writing it?")
        fdst.write(view[:n])
        left -= n


def check_output(src: PathLike, dst: PathLike, force: bool = False) -> None:
    """Raise (as write_with_metadata would) if ``dst`` cannot receive a copy of ``src``: call it before long work."""
    src, dst = Path(src), Path(dst)
    parent = dst.parent
    if not parent.exists():
        raise FileNotFoundError(f"cannot write {dst}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ValueError(f"cannot write {dst}: {parent} is not a directory")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"refusing to write over the input: {dst} is the same file as {src}; "
                         f"choose another output path")
    if os.path.isdir(dst):
        raise ValueError(f"cannot write {dst}: it is a directory; give a file path")
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} already exists; choose another output path or overwrite it "
                              f"(--force on the command line, force=True in Python)")


def _o_tmpfile_usable() -> bool:
    return hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


_USE_O_TMPFILE = True  # tests switch it off to exercise the named-temp-file fallback
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _tmp_name(dst: Path) -> str:
    return f".{dst.name}.{secrets.token_hex(6)}.tmp"


def _unlink_quiet(name: Optional[str], dirfd: int) -> None:
    if name is not None:
        try:
            os.unlink(name, dir_fd=dirfd)
        except OSError:
            pass


def _flush_and_sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_anonymous(dirfd: int, dst: Path, write, force: bool) -> bool:
    """O_TMPFILE path: the file has no name until it is complete. False if unsupported here."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | _CLOEXEC, 0o666, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.ENOSYS):
            return False
        raise
    with os.fdopen(fd, "wb", buffering=1 << 20) as f:
        write(f)
        _flush_and_sync(f)
        proc = f"/proc/self/fd/{f.fileno()}"
        # linkat(AT_FDCWD, "/proc/self/fd/N", dirfd, name, AT_SYMLINK_FOLLOW): passing dst_dir_fd
        # makes Python call linkat with AT_SYMLINK_FOLLOW (plain link() would fail with EXDEV)
        name = _tmp_name(dst) if force else dst.name
        try:
            os.link(proc, name, dst_dir_fd=dirfd, follow_symlinks=True)
        except FileExistsError:
            if force:
                raise
            raise FileExistsError(f"{dst} already exists (it appeared while writing); "
                                  f"choose another output path or overwrite it with --force") from None
        except OSError:
            return False  # linking an O_TMPFILE is not allowed here: use a named temp file
        if force:
            try:
                os.replace(name, dst.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except BaseException:
                _unlink_quiet(name, dirfd)
                raise
    return True


def _write_named(dirfd: int, dst: Path, write, force: bool) -> None:
    """Fallback: a hidden temp file next to dst, renamed into place when complete, removed on error."""
    for _ in range(100):
        tmp: Optional[str] = _tmp_name(dst)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _CLOEXEC, 0o666, dir_fd=dirfd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary file in {dst.parent}")
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            write(f)
            _flush_and_sync(f)
        if force:
            os.replace(tmp, dst.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            tmp = None
        else:
            try:  # a hard link never clobbers an existing dst
                os.link(tmp, dst.name, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
            except FileExistsError:
                raise FileExistsError(f"{dst} already exists (it appeared while writing); "
                                      f"choose another output path or overwrite it with --force") from None
            except OSError:  # a file system without hard links
                if os.path.lexists(dst):
                    raise FileExistsError(f"{dst} already exists") from None
                os.replace(tmp, dst.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                tmp = None
    finally:
        _unlink_quiet(tmp, dirfd)


def _atomic_write(dst: Path, write, force: bool) -> None:
    """Create ``dst`` with the bytes ``write(fileobj)`` produces, all or nothing.

    Prefers an anonymous O_TMPFILE in the destination directory, linked into place once
    complete (a crash, even SIGKILL, leaves nothing behind); falls back to a hidden
    named temp file that is renamed into place (and removed on any error). ``write``
    may be called a second time (from the start) if the first way turns out unusable.
    """
    dirfd = os.open(dst.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        if not (_USE_O_TMPFILE and _o_tmpfile_usable() and _write_anonymous(dirfd, dst, write, force)):
            _write_named(dirfd, dst, write, force)
        try:  # make the new directory entry durable (best effort)
            os.fsync(dirfd)
        except OSError:
            pass
    finally:
        os.close(dirfd)


def write_with_metadata(
    src: PathLike,
    dst: PathLike,
    fields: Dict[str, Any],
    *,
    drop_prefix: Optional[str] = "triattention.",
    force: bool = False,
) -> Dict[str, Any]:
    """Write a copy of the GGUF ``src`` to ``dst`` with the metadata ``fields`` added.

    ``fields`` maps keys to values, e.g. ``Calibration.gguf_fields()``. The original
    key/value pairs are kept in order, byte for byte, except those whose key starts with
    ``drop_prefix`` or is in ``fields`` (they are replaced); the new keys follow them. The
    tensor infos are kept and the tensor data is streamed across byte-identical, the
    data section starting at the next multiple of ``general.alignment``.

    The output appears at ``dst`` only once complete (never a partial file, even if the
    process is killed); ``src`` is only read.

    Raises ValueError (``dst`` is ``src``, even through another path or a link; ``src``
    is a directory, not GGUF, truncated or of an unsupported GGUF version; a value that
    cannot be stored), FileNotFoundError (``src`` or ``dst``'s directory missing) or
    FileExistsError (``dst`` exists and ``force`` is False).

    Returns a summary: ``src``, ``dst``, ``replaced`` (whether existing keys were
    replaced), ``replaced_keys``, ``added_keys``, ``n_kv``, ``n_tensors``,
    ``alignment``, ``data_offset`` (output), ``tensor_data_bytes``, ``bytes`` (output size).
    """
    src_p, dst_p = Path(src), Path(dst)
    hdr = read_header(src_p)
    check_output(src_p, dst_p, force)
    if not isinstance(fields, dict):
        raise TypeError("fields must be a dict of metadata key -> value")
    encoded = [encode_value(k, v) for k, v in fields.items()]  # validate before writing anything

    def dropped(key: str) -> bool:
        return key in fields or bool(drop_prefix) and key.startswith(drop_prefix)

    keep = [kv for kv in hdr.kv if not dropped(kv.key)]
    replaced = [kv.key for kv in hdr.kv if dropped(kv.key)]
    alignment = DEFAULT_ALIGNMENT
    for kv in keep:
        if kv.key == "general.alignment":
            alignment = int(kv.value)
    if alignment != hdr.alignment:
        raise ValueError(f"the new metadata would change general.alignment ({hdr.alignment} -> {alignment}), "
                         f"which would move the tensor data; keep general.alignment")

    with open(src_p, "rb") as fsrc:
        if os.fstat(fsrc.fileno()).st_size != hdr.file_size:
            raise ValueError(f"{src_p} changed while it was being read; is another program writing it?")
        head = bytearray(MAGIC)
        head += struct.pack("<IQQ", hdr.version, len(hdr.tensors), len(keep) + len(encoded))
        for kv in keep:
            fsrc.seek(kv.start)
            head += fsrc.read(kv.end - kv.start)
        for b in encoded:
            head += b
        fsrc.seek(hdr.tensor_info_start)
        head += fsrc.read(hdr.header_end - hdr.tensor_info_start)
        data_offset = _align(len(head), alignment)
        head += bytes(data_offset - len(head))
        n_data = max(0, hdr.file_size - hdr.data_offset)

        def write(fdst) -> None:
            fdst.write(head)
            _copy_data(fsrc, fdst, hdr.data_offset, n_data)

        _atomic_write(dst_p, write, force)

    return {
        "src": str(src_p),
        "dst": str(dst_p),
        "replaced": bool(replaced),
        "replaced_keys": replaced,
        "added_keys": list(fields),
        "n_kv": len(keep) + len(encoded),
        "n_tensors": len(hdr.tensors),
        "alignment": alignment,
        "data_offset": data_offset,
        "tensor_data_bytes": n_data,
        "bytes": data_offset + n_data,
    }


def write_metadata_only(dst: PathLike, fields: Dict[str, Any], *, force: bool = False) -> Path:
    """Write a GGUF that holds only the metadata ``fields`` (no tensors), all or nothing, like
    write_with_metadata. A calibration sidecar is one: the model's architecture and name plus the
    triattention.* statistics, which the policy reads beside the model it belongs to."""
    dst_p = Path(dst)
    if dst_p.exists() and not force:
        raise FileExistsError(f"{dst_p} exists; pass force=True to replace it")
    encoded = [encode_value(k, v) for k, v in fields.items()]
    data = MAGIC + struct.pack("<IQQ", 3, 0, len(encoded)) + b"".join(encoded)
    _atomic_write(dst_p, lambda f: f.write(data), force)
    return dst_p
