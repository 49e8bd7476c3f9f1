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
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app.message.recorddict import _SyncedDict
from flwr.common.constant import SType

__all__ = ["array_numpy", "fast_array_reads", "state_dict", "to_record"]

#: (dtype, shape) -> np.save's header for them, and the dtype's name
_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, str]] = {}
#: (header, dtype, shape) -> whether the data after the header is a C-order native array of them
_PLAIN: dict[tuple[bytes, str, tuple[int, ...]], bool] = {}
_flower_numpy = Array.numpy
_flower_from_numpy = Array.__dict__["from_numpy_ndarray"]  # (the classmethod object)


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
    a new writable array as before. Also, ``Array(ndarray)`` writes its bytes as ``_npy_array`` does
    (the strategy's aggregate goes back into an ``ArrayRecord`` this way), and a ``RecordDict``'s
    ``array_records`` / ``metric_records`` / ``config_records`` views are built as Flower builds
    them, without storing every record into the ``RecordDict`` again on the way (``_record_view``).
    Measured on 2 cores: FedAvg's ``aggregate_train`` of ten MLR replies, 0.70 ms a round before."""
    saved = Array.numpy, Array.from_numpy_ndarray, RecordDict.array_records, RecordDict.metric_records, \
        RecordDict.config_records
    Array.numpy = array_numpy
    Array.from_numpy_ndarray = classmethod(_array_from_numpy)
    RecordDict.array_records = _record_view(ArrayRecord)
    RecordDict.metric_records = _record_view(MetricRecord)
    RecordDict.config_records = _record_view(ConfigRecord)
    try:
        yield
    finally:
        Array.numpy, Array.from_numpy_ndarray, RecordDict.array_records, RecordDict.metric_records, \
            RecordDict.config_records = saved


def _record_view(kind: type) -> property:
    """Flower's ``RecordDict.<kind>_records`` (flwr 1.42): a ``_SyncedDict`` of the records of type ``kind``,
    which writes through to the ``RecordDict``. Flower fills it with ``view[key] = record``, which
    type-checks each record and then stores it into the ``RecordDict`` again under its own key (a
    no-op, 10-20 us a record); this fills the same view's dict directly."""
    def view(self: RecordDict):
        synced = _SyncedDict[kind](self, kind)
        data = synced.__dict__["_data"]
        for key, record in self.items():
            if isinstance(record, kind):
                data[key] = record
        return synced
    return property(view)


def _npy_bytes(array: np.ndarray) -> tuple[bytes, str] | None:
    """What ``np.save`` writes for a C-order numeric ``array``, and its dtype's name (None for another
    array: Flower's own ``np.save`` then), from the header ``np.save`` wrote for its dtype and shape."""
    if not array.flags.c_contiguous or array.dtype.kind not in "biufc":
        return None
    key = (array.dtype.str, array.shape)
    known = _HEADERS.get(key)
    if known is None:
        buffer = BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        _HEADERS[key] = data[:len(data) - array.nbytes], str(array.dtype)
        return data, str(array.dtype)
    header, dtype = known
    return header + array.tobytes(), dtype


def _array_from_numpy(cls, ndarray: np.ndarray) -> Array:
    """Flower's ``Array.from_numpy_ndarray``: the same bytes, made without ``np.save`` (``_npy_bytes``)."""
    made = _npy_bytes(ndarray) if isinstance(ndarray, np.ndarray) else None
    if made is None:
        return _flower_from_numpy.__func__(cls, ndarray)
    data, dtype = made
    return Array(dtype=dtype, shape=tuple(ndarray.shape), stype=SType.NUMPY, data=data)


def _npy_array(tensor: torch.Tensor) -> Array:
    return _array_from_numpy(Array, tensor.detach().cpu().numpy())  # (a transposed view: Flower's own bytes)


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(tensors)`` (a torch state dict) with the same bytes, made without ``np.save``."""
    record = ArrayRecord()  # (ArrayRecord(dict) would copy every Array once more)
    for key, value in tensors.items():
        record[key] = _npy_array(value)
    return record


def state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, each array read by ``array_numpy``."""
    return {key: torch.from_numpy(array_numpy(value)) for key, value in record.items()}
