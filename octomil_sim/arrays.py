"""Tensors to and from Flower's ``ArrayRecord`` without ``np.save`` / ``np.load`` for every array.

A Flower ``Array`` of stype ``numpy.ndarray`` holds the bytes ``np.save`` writes: an ``.npy`` header
(dtype, memory order, shape) followed by the raw data. Flower makes them with ``np.save`` into a
``BytesIO`` and reads them with ``np.load``, about 30-50 us an array whatever its size: with small
models (the MLR of the Synthetic experiments: two arrays) that was a tenth of a client's work and a
millisecond of the server's average every round. Here:

- ``to_record`` writes the same bytes (the header ``np.save`` wrote for the same dtype and shape,
  cached, then the data);
- ``array_numpy`` reads an ``Array`` as ``np.load`` would (a new, writable array): when its header is
  one it has checked once (native byte order, C order, this dtype and shape), straight from the
  bytes after it; any other ``Array`` through Flower's ``numpy()``;
- ``state_dict`` is ``ArrayRecord.to_torch_state_dict`` with ``array_numpy``;
- ``fast_array_reads`` makes Flower's own reads (a strategy's aggregation) use ``array_numpy``.

The bytes, the values and Flower's byte counts are those of Flower's own path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["array_numpy", "fast_array_reads", "state_dict", "to_record"]

#: (dtype, shape) -> np.save's header for them, and the dtype's name
_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, str]] = {}
#: (header, dtype, shape) -> whether the data after the header is a C-order native array of them
_PLAIN: dict[tuple[bytes, str, tuple[int, ...]], bool] = {}
_flower_numpy = Array.numpy


def array_numpy(array: Array) -> np.ndarray:
    """``array.numpy()`` (Flower's ``np.load``), read without ``np.load`` when its header allows."""
    if array.stype == SType.NUMPY:
        try:
            dtype = np.dtype(array.dtype)
        except (TypeError, ValueError):  # e.g. a structured dtype's name: Flower's way reads it
            return _flower_numpy(array)
        start = len(array.data) - dtype.itemsize * math.prod(array.shape)
        if start > 0:
            key = (array.data[:start], array.dtype, tuple(array.shape))
            plain = _PLAIN.get(key)
            if plain is None:
                plain = _PLAIN[key] = _is_plain(key[0], dtype, key[2])
            if plain:
                return np.frombuffer(array.data, dtype, offset=start).reshape(array.shape).copy()
    return _flower_numpy(array)


def _is_plain(header: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> bool:
    """Whether ``header`` is a complete .npy header of a C-order array of ``dtype`` (native byte
    order) and ``shape``."""
    fp = BytesIO(header)
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read(fp)
    except ValueError:
        return False
    return (fp.tell() == len(header) and not fortran and tuple(got_shape) == shape and got_dtype == dtype
            and got_dtype.isnative)


@contextmanager
def fast_array_reads() -> Iterator[None]:
    """Inside the block, ``Array.numpy`` is ``array_numpy``: what Flower's strategies read (their
    aggregation decodes every reply's arrays) is read without ``np.load``. Same values, same dtype,
    a new writable array as before."""
    numpy = Array.numpy
    Array.numpy = array_numpy
    try:
        yield
    finally:
        Array.numpy = numpy


def _npy_array(tensor: torch.Tensor) -> Array:
    array = tensor.detach().cpu().numpy()
    if not array.flags.c_contiguous:  # e.g. a transposed view: Flower's own bytes (a Fortran-order header)
        return Array.from_numpy_ndarray(array)
    key = (array.dtype.str, array.shape)
    known = _HEADERS.get(key)
    if known is None:
        buffer = BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        _HEADERS[key] = data[:len(data) - array.nbytes], str(array.dtype)
        return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=SType.NUMPY, data=data)
    header, dtype = known
    return Array(dtype=dtype, shape=array.shape, stype=SType.NUMPY, data=header + array.tobytes())


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(tensors)`` (a torch state dict) with the same bytes, made without ``np.save``."""
    record = ArrayRecord()  # (ArrayRecord(dict) would copy every Array once more)
    for key, value in tensors.items():
        record[key] = _npy_array(value)
    return record


def state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, each array read by ``array_numpy``."""
    return {key: torch.from_numpy(array_numpy(value)) for key, value in record.items()}
