"""``octomil_sim.arrays``: Flower's ``Array`` bytes written and read without ``np.save`` / ``np.load``,
with Flower's bytes and values."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from octomil_sim.arrays import array_numpy, fast_array_reads, state_dict, to_record

TENSORS = {
    "matrix": torch.randn(10, 60),
    "vector": torch.randn(10),
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 3),
    "long": torch.arange(7),
    "half": torch.randn(3, 4).half(),
    "double": torch.randn(2, 3, 4, dtype=torch.float64),
    "bool": torch.tensor([True, False, True]),
    "transposed": torch.randn(6, 5).T,  # not contiguous
}


def test_to_record_writes_flowers_bytes():
    ours, flowers = to_record(TENSORS), ArrayRecord(TENSORS)
    assert list(ours.keys()) == list(flowers.keys())
    for key in TENSORS:
        a, b = ours[key], flowers[key]
        assert (a.dtype, tuple(a.shape), a.stype) == (b.dtype, tuple(b.shape), b.stype), key
        assert a.data == b.data, key  # (a transposed view: Flower's own way, a Fortran-order header)
        assert np.array_equal(a.numpy(), TENSORS[key].numpy()), key
    assert to_record(TENSORS)["matrix"].data == ours["matrix"].data  # the cached header again
    assert ours.count_bytes() == flowers.count_bytes()


@pytest.mark.parametrize("key", sorted(TENSORS))
def test_array_numpy_reads_what_np_load_reads(key):
    array = ArrayRecord(TENSORS)[key]  # Flower's own bytes (np.save), Fortran order for "transposed"
    got, want = array_numpy(array), np.load(io.BytesIO(array.data), allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable
    if got.size:
        got.reshape(-1)[0] = 1 - got.reshape(-1)[0]  # a copy: the message's bytes never change
        assert np.array_equal(array_numpy(array), want)


def test_array_numpy_falls_back_to_flower_for_other_byte_orders_and_dtypes():
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    got = array_numpy(Array(big_endian))
    assert got.dtype == big_endian.dtype and np.array_equal(got, big_endian)
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    structured["a"] = [1, 2, 3]
    got = array_numpy(Array(structured))
    assert got.dtype == structured.dtype and np.array_equal(got, structured)


def test_a_header_is_trusted_only_with_its_own_dtype_and_shape():
    """An Array whose fields disagree with its bytes' header is read as the header says (as np.load
    does), even after the same header was seen with matching fields."""
    right = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(array_numpy(right), np.arange(6, dtype=np.float32).reshape(2, 3))
    wrong = Array(dtype="float32", shape=(3, 2), stype=right.stype, data=right.data)
    assert array_numpy(wrong).shape == (2, 3)


def test_state_dict_and_fast_reads_match_flowers():
    record = ArrayRecord(TENSORS)
    ours, flowers = state_dict(record), record.to_torch_state_dict()
    assert list(ours) == list(flowers)
    assert all(torch.equal(ours[k], flowers[k]) and ours[k].dtype == flowers[k].dtype for k in ours)
    numpy = Array.numpy
    with pytest.raises(RuntimeError):
        with fast_array_reads():
            assert Array.numpy is array_numpy
            assert np.array_equal(record["matrix"].numpy(), TENSORS["matrix"].numpy())
            raise RuntimeError
    assert Array.numpy is numpy


ARRAYS = {**{k: v.numpy() for k, v in TENSORS.items()}, "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
          "structured": np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), "fortran": np.asfortranarray(np.ones((3, 4))),
          "zero_d": np.array(2.5), "complex": np.arange(4) * 1j}


def test_fast_array_writes_give_flowers_bytes_and_restore_flowers_way():
    """Inside ``fast_array_reads``, ``Array(ndarray)`` (what a strategy's aggregate makes) writes the
    bytes ``np.save`` writes, for every dtype, order and shape; outside it, Flower's own method."""
    flowers = {k: Array(v) for k, v in ARRAYS.items()}
    method = Array.__dict__["from_numpy_ndarray"]
    with fast_array_reads():
        assert Array.__dict__["from_numpy_ndarray"] is not method
        ours = {k: Array(v) for k, v in ARRAYS.items()}
        again = Array(ARRAYS["matrix"] + 1)  # the cached header, new data
    assert Array.__dict__["from_numpy_ndarray"] is method
    for key in ARRAYS:
        a, b = ours[key], flowers[key]
        assert (a.dtype, tuple(a.shape), a.stype, a.data) == (b.dtype, tuple(b.shape), b.stype, b.data), key
    assert again.data == Array(ARRAYS["matrix"] + 1).data


def test_fast_record_views_are_flowers_views():
    """``array_records`` / ``metric_records`` / ``config_records`` inside ``fast_array_reads``: the same
    records in the same order as Flower's, and a view still writes through to its ``RecordDict``."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    def content():
        return RecordDict({"a": ArrayRecord({"w": Array(np.ones(3))}), "m": MetricRecord({"loss": 0.5}),
                           "c": ConfigRecord({"lr": 0.1}), "b": ArrayRecord({"v": Array(np.zeros(2))}),
                           "n": MetricRecord({"steps": 4})})

    records = content()
    kinds = ("array_records", "metric_records", "config_records")
    flowers = {kind: dict(getattr(records, kind)) for kind in kinds}
    with fast_array_reads():
        ours = {kind: dict(getattr(records, kind)) for kind in kinds}
        view = records.metric_records
        view["extra"] = MetricRecord({"x": 1.0})
        with pytest.raises(TypeError):
            view["bad"] = ConfigRecord({"y": 1})
    assert {k: list(v.items()) for k, v in ours.items()} == {k: list(v.items()) for k, v in flowers.items()}
    assert all(ours[k][name] is flowers[k][name] for k in kinds for name in ours[k])
    assert list(flowers["array_records"]) == ["a", "b"] and list(flowers["metric_records"]) == ["m", "n"]
    assert "extra" in records and "extra" in records.metric_records and "bad" not in records


def test_fedavgs_aggregate_is_the_same_with_the_fast_records(task_identity):
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    replies = []
    for client in range(4):
        sent = Message(RecordDict(), dst_node_id=client + 1, message_type="train", group_id="1")
        arrays = ArrayRecord({"w": Array(np.random.default_rng(client).normal(size=(5, 3)).astype(np.float32)),
                              "b": Array(np.full(5, client, dtype=np.float32))})
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 + client})}),
                               reply_to=sent))
    strategy = FedAvg()
    flowers, _ = strategy.aggregate_train(1, replies)
    with fast_array_reads():
        ours, _ = strategy.aggregate_train(1, replies)
    assert list(ours) == list(flowers) and all(ours[k].data == flowers[k].data for k in ours)
