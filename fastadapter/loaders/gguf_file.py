"""``read_gguf``: the metadata, tensor table and raw tensor bytes of a GGUF file (llama.cpp's single-file format).

A GGUF file is ``GGUF`` magic, version, tensor and key counts, the metadata (``key: typed value``), the tensor
table (name, dimensions, ggml type, offset) and, at the next ``general.alignment`` boundary, the tensor data.
This reader walks the header once with :mod:`struct` and memory-maps the data: each tensor is a read-only
``uint8`` (or float) view of the file, which the ``gguf`` package's own dequantizers turn into floats
(:func:`gguf.quants.dequantize`). The quantization formats, type sizes and value-type codes all come from the
``gguf`` package; only the container is walked here, because ``gguf.GGUFReader`` builds a NumPy view for every
element of every metadata array, which takes minutes for a 262,144-token vocabulary on a busy CPU.

String arrays (the vocabulary, the merges) are decoded only when asked for by key; other string arrays are
skipped and stand as their length.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, Collection, Union

import numpy as np

#: GGUF versions read (version 1 counted in 32 bits and is no longer written).
GGUF_VERSIONS = (2, 3)
#: Alignment of the tensor data when ``general.alignment`` is absent (llama.cpp's default).
DEFAULT_ALIGNMENT = 32


class GGUFFormatError(ValueError):
    """A file that is not GGUF, of an unknown version, or truncated; the message names the file and what is
    wrong."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    Attributes:
        name: the GGUF name (``blk.0.attn_q.weight``).
        shape: the logical shape in PyTorch order (``[out_features, in_features]`` for a projection; GGUF
            lists dimensions fastest first).
        qtype: the ggml type (:class:`gguf.GGMLQuantizationType`).
        data: a read-only view of the file's bytes: ``uint8`` ``[rows, bytes per row]`` for block-quantized
            types, values of ``shape`` for F32/F16 — exactly what :func:`gguf.quants.dequantize` takes.
    """

    name: str
    shape: tuple[int, ...]
    qtype: Any
    data: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (``{key: value}``: ints, floats, bools, strings, lists) and tensors by name."""

    path: str
    metadata: dict
    tensors: dict[str, GGUFTensor] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def _struct_formats():
    from gguf import GGUFValueType as T

    return {T.UINT8: "<B", T.INT8: "<b", T.BOOL: "<?", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I",
            T.INT32: "<i", T.FLOAT32: "<f", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


class _Cursor:
    """Reads little-endian values from the memory-mapped file, with truncation reported as GGUFFormatError."""

    def __init__(self, path: str, blob: np.ndarray):
        self.path, self.blob, self.pos = path, blob, 0
        self.formats = _struct_formats()

    def unpack(self, fmt: str):
        try:
            values = struct.unpack_from(fmt, self.blob, self.pos)
        except struct.error:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header (at byte {self.pos:,} of "
                                  f"{self.blob.size:,})") from None
        self.pos += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > self.blob.size:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header (a string of {length:,} bytes at byte "
                                  f"{self.pos:,} runs past the end, {self.blob.size:,})")
        raw = bytes(self.blob[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, decode_strings: bool):
        from gguf import GGUFValueType

        if value_type in self.formats:
            return self.unpack(self.formats[value_type])
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type != GGUFValueType.ARRAY:
            raise GGUFFormatError(f"{self.path}: unknown GGUF metadata value type {value_type} at byte {self.pos:,}")
        element_type, count = self.unpack("<IQ")
        if element_type in self.formats:
            fmt = self.formats[element_type]
            width = struct.calcsize(fmt)
            if self.pos + count * width > self.blob.size:
                raise GGUFFormatError(f"{self.path}: truncated GGUF header (an array of {count:,} values)")
            values = np.frombuffer(self.blob, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
            self.pos += count * width
            return values
        if element_type == GGUFValueType.STRING:
            if decode_strings:
                return [self.string() for _ in range(count)]
            for _ in range(count):  # strings of varying length: the lengths must be walked
                length = self.unpack("<Q")
                self.pos += length
            return count
        return [self.value(element_type, decode_strings) for _ in range(count)]


def read_gguf(path: Union[str, os.PathLike], string_arrays: Collection[str] = ()) -> GGUFFile:
    """The metadata and tensors of the GGUF file at ``path``, the tensor data memory-mapped, nothing copied.

    Args:
        string_arrays: metadata keys whose string arrays are decoded (``tokenizer.ggml.tokens``); any other
            string array is skipped and read as its length.

    Raises:
        FileNotFoundError: nothing at ``path``.
        GGUFFormatError: not a GGUF file, an unknown version, a truncated header or tensor data.
    """
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf (or fastadapter[gguf])") \
            from None

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if os.path.getsize(path) < 24:
        raise GGUFFormatError(f"{path}: {os.path.getsize(path)} bytes, too short for a GGUF file")
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    if bytes(blob[:4]) != b"GGUF":
        raise GGUFFormatError(f"{path}: not a GGUF file (it starts with {bytes(blob[:4])!r}, expected b'GGUF')")
    cursor = _Cursor(path, blob)
    cursor.pos = 4
    version, tensor_count, kv_count = cursor.unpack("<IQQ")
    if version not in GGUF_VERSIONS:
        raise GGUFFormatError(f"{path}: GGUF version {version}; fastadapter reads versions "
                              f"{', '.join(map(str, GGUF_VERSIONS))}")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"), key in string_arrays)
    table = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        dims = cursor.unpack(f"<{n_dims}Q") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        raw_type, offset = cursor.unpack("<IQ")
        table.append((name, tuple(reversed(dims)), raw_type, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, raw_type, offset in table:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"{path}: tensor {name!r} has ggml type {raw_type}, which the installed gguf "
                                  f"package does not know") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block_size:
            raise GGUFFormatError(f"{path}: tensor {name!r} of shape {list(shape)}: rows of {shape[-1]} values "
                                  f"are not whole {qtype.name} blocks of {block_size}")
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        row_bytes = (shape[-1] if shape else 1) // block_size * type_size
        start = data_start + offset
        if start + rows * row_bytes > blob.size:
            raise GGUFFormatError(f"{path}: tensor {name!r} ({qtype.name}, shape {list(shape)}) runs past the end "
                                  f"of the file ({blob.size:,} bytes): the file is truncated")
        data = blob[start:start + rows * row_bytes]
        if qtype == GGMLQuantizationType.F32:
            data = data.view(np.float32).reshape(shape)
        elif qtype == GGMLQuantizationType.F16:
            data = data.view(np.float16).reshape(shape)
        else:
            data = data.reshape(shape[:-1] + (row_bytes,) if len(shape) > 1 else (row_bytes,))
        tensors[name] = GGUFTensor(name, shape, qtype, data)
    return GGUFFile(path, metadata, tensors)
