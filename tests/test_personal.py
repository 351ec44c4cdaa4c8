"""Personal models on the device (issue 18): the head stays on the device and is used.

Real apps on fedge's in-process Grid (every message through Flower's protobuf):
the coordinator's side records every reply's bytes, and none of them holds the
personal head a device fitted; `fedge predict` next to a personal file
predicts with it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message
from typer.testing import CliRunner

from fedge.client.client_app import make_client_app
from fedge.client.compression_mod import compression_mod
from fedge.client.personal import held_personal, personal_mod
from fedge.common import flower_compat as fc
from fedge.common.arrays import model_to_arrays
from fedge.common.contract import PERSONAL_PATH_KEY, PERSONAL_STATE_KEY
from fedge.common.export import export_model
from fedge.common.personal import (
    PERSONAL_FILE,
    PersonalError,
    apply_personal,
    head_keys,
    load_personal,
    personalize,
    save_personal,
)
from fedge.common.task import DIGITS
from fedge.common.training import evaluate
from fedge.server.inprocess_grid import InProcessGrid, run_server_app_inprocess
from fedge.server.server_app import make_server_app

runner = CliRunner()
CONFIG = {"task": "digits", "num-rounds": 2, "fraction-train": 1.0, "min-train-nodes": 3,
          "partition": "dirichlet", "alpha": 0.3, "seed": 0, "local-epochs": 1,
          "personalize": "head", "personal-epochs": 5}


class RecordingGrid(InProcessGrid):
    """Keeps the serialized bytes of every reply the server side receives."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.received: list[bytes] = []

    def _execute(self, pending):  # type: ignore[no-untyped-def]
        reply = super()._execute(pending)
        if reply is not None:
            self.received.append(fc.message_to_bytes(reply))
        return reply


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_the_coordinator_never_receives_the_personal_head(tmp_path, codec: str) -> None:
    config = {**CONFIG, "codec": codec}
    nodes = [{PERSONAL_PATH_KEY: str(tmp_path / f"dev{i}" / PERSONAL_FILE)} for i in range(3)]
    grid = RecordingGrid(make_client_app(mods=[compression_mod, personal_mod]), 3,
                         run_config=config, node_configs=nodes, seed=0)
    run_server_app_inprocess(make_server_app(config), grid)
    assert len(grid.received) == 6  # 3 devices x 2 rounds, each reply recorded
    keys = head_keys(DIGITS.make_model())
    for i, node in enumerate(grid.nodes):
        head = held_personal(node.context)
        assert head is not None and sorted(head) == sorted(keys)
        on_disk = load_personal(tmp_path / f"dev{i}" / PERSONAL_FILE)
        for key in keys:
            np.testing.assert_array_equal(on_disk[key], head[key])
            raw = np.ascontiguousarray(head[key], dtype=np.float32).tobytes()
            for reply in grid.received:  # neither the values nor the state key travel
                assert raw not in reply
                assert PERSONAL_STATE_KEY.encode() not in reply
        for reply in grid.received:
            msg = fc.message_from_bytes(reply)
            for record in msg.content.array_records.values():
                for name, array in record.items():
                    if name in head:
                        assert not np.allclose(array.numpy(), head[name])


def test_personal_mod_leaves_the_reply_untouched(tmp_path) -> None:
    """With and without the mod, a device's reply holds the same bytes of arrays."""
    config = {**CONFIG, "num-rounds": 1}
    nodes = [{PERSONAL_PATH_KEY: str(tmp_path / f"dev{i}" / PERSONAL_FILE)} for i in range(3)]
    plain = RecordingGrid(make_client_app(), 3, run_config={**config, "personalize": "none"})
    mine = RecordingGrid(make_client_app(mods=[personal_mod]), 3, run_config=config,
                         node_configs=nodes)
    run_server_app_inprocess(make_server_app({**config, "personalize": "none"}), plain)
    run_server_app_inprocess(make_server_app(config), mine)

    def arrays(data: bytes) -> dict[str, bytes]:
        msg: Message = fc.message_from_bytes(data)
        return {k: a.data for rec in msg.content.array_records.values() for k, a in rec.items()}

    assert [arrays(r) for r in plain.received] == [arrays(r) for r in mine.received]
    assert all(held_personal(n.context) is None for n in plain.nodes)
    assert all(held_personal(n.context) is not None for n in mine.nodes)


def test_without_a_personal_file_the_head_is_fitted_when_evaluated() -> None:
    """A simulated device keeps no file: it fits nothing after training, and fits its head
    from the evaluate message's model when asked, reporting the personal accuracy."""
    trained_only = RecordingGrid(make_client_app(mods=[personal_mod]), 3,
                                 run_config={**CONFIG, "num-rounds": 1})
    run_server_app_inprocess(make_server_app({**CONFIG, "num-rounds": 1}), trained_only)
    assert all(held_personal(n.context) is None for n in trained_only.nodes)

    config = {**CONFIG, "num-rounds": 1, "fraction-evaluate": 1.0}
    grid = RecordingGrid(make_client_app(mods=[personal_mod]), 3, run_config=config)
    run_server_app_inprocess(make_server_app(config), grid)
    assert all(held_personal(n.context) is not None for n in grid.nodes)
    personal = [m["eval-acc-personal"]
                for reply in grid.received
                for m in fc.message_from_bytes(reply).content.metric_records.values()
                if "eval-acc-personal" in m]
    assert len(personal) == 3 and all(0.0 <= float(a) <= 1.0 for a in personal)


def _local_setup():  # a global model trained a little, and one skewed client
    from fedge.common.training import train

    cfg = {"partition": "dirichlet", "alpha": 0.1, "seed": 0}
    model = DIGITS.make_model()
    pool = DIGITS.load_partition(0, 1, {})
    train(model, pool.x_train[:200], pool.y_train[:200], epochs=2, batch_size=16, lr=0.3)
    return model, DIGITS.load_partition(1, 10, cfg)


def test_a_personal_head_fits_the_client_better() -> None:
    model, data = _local_setup()
    head = personalize(model, data.x_train, data.y_train, mode="head", epochs=20, lr=0.1)
    assert sorted(head) == sorted(head_keys(model))  # only the head
    mine = apply_personal(DIGITS.make_model(), {**model_to_arrays(model), **head})
    before = evaluate(model, data.x_test, data.y_test)[1]
    after = evaluate(mine, data.x_test, data.y_test)[1]
    assert after > before


def test_predict_uses_the_personal_model_next_to_the_model_file(tmp_path) -> None:
    from fedge.cli import app

    model, data = _local_setup()
    arrays = model_to_arrays(model)
    folder = tmp_path / "device"
    folder.mkdir()
    path = folder / "model.fp32.pb"
    path.write_bytes(export_model(arrays, fmt="fp32", task="digits", input_shape=(1, 8, 8)))
    # a head that always says class 7: the device's predictions must follow it
    head = {k: np.zeros_like(arrays[k]) for k in head_keys(model)}
    bias_key = next(k for k in head if k.endswith("bias"))
    head[bias_key][7] = 5.0
    x = data.x_test[:6].astype(np.float32)
    np.save(tmp_path / "x.npy", x)

    def predict(*extra: str) -> dict:
        result = runner.invoke(app, ["predict", "--model", str(path), *extra, "--json",
                                     str(tmp_path / "x.npy")])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    global_only = predict()
    assert global_only["model"]["personal"] is None
    save_personal(folder / PERSONAL_FILE, head)
    with_head = predict()
    assert with_head["model"]["personal"] == str(folder / PERSONAL_FILE)
    assert [p["class"] for p in with_head["predictions"]] == [7] * 6
    assert [p["class"] for p in global_only["predictions"]] != [7] * 6
    assert predict("--personal", "none")["model"]["personal"] is None


def test_int8_predictor_takes_a_float_personal_head(tmp_path) -> None:
    from fedge.common.inference import load_predictor

    model, data = _local_setup()
    arrays = model_to_arrays(model)
    predictor = load_predictor(export_model(arrays, fmt="int8", task="digits",
                                            input_shape=(1, 8, 8)))
    head = {k: np.zeros_like(arrays[k]) for k in head_keys(model)}
    head[next(k for k in head if k.endswith("bias"))][3] = 1.0
    apply_personal(predictor.model, head)
    assert set(predictor.predict(data.x_test[:5]).classes.tolist()) == {3}


def test_a_personal_file_that_does_not_fit_is_refused(tmp_path) -> None:
    model = DIGITS.make_model()
    with pytest.raises(PersonalError, match="not in the model"):
        apply_personal(model, {"nope.weight": np.zeros((2, 2), np.float32)})
    key = head_keys(model)[0]
    with pytest.raises(PersonalError, match="shape"):
        apply_personal(model, {key: np.zeros((2, 2), np.float32)})
    with pytest.raises(PersonalError, match="NaN"):
        apply_personal(model, {key: np.full(model.state_dict()[key].shape, np.nan,
                                            np.float32)})
    bad = tmp_path / PERSONAL_FILE
    bad.write_bytes(b"not an npz")
    with pytest.raises(PersonalError, match="not a personal-model file"):
        load_personal(bad)
    assert torch.equal(model.state_dict()[key], DIGITS.make_model().state_dict()[key])
