"""One fedge ClientApp, and it compresses wherever it runs -- exactly once.

`fedge.client.client_app:app` carries the compression mod; the edge runtime
loads that very object (no mod added by name), and a second compression mod
around it passes through instead of encoding the encoded update again.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from test_client_app import make_context, train_message

from fedge.client import client_app
from fedge.client.app_ref import DEFAULT_APP_REF
from fedge.client.app_runner import load_client_app
from fedge.client.compression_mod import compression_mod
from fedge.common.arrays import model_to_arrays, model_to_record
from fedge.common.contract import CODEC_KEY, RESIDUAL_STATE_KEY, UPDATE_KEY
from fedge.common.task import resolve_task
from fedge.common.update_array import packed_bytes
from fedge.common.update_codec import decode_update

MODEL = resolve_task("digits").make_model()
LAYOUT = {k: (tuple(a.shape), a.dtype) for k, a in model_to_arrays(MODEL).items()}


CODEC = "topk=0.1+int8"  # top-k: error feedback moves the model ahead by the residual


def _train(app, context: Context, server_round: int = 1) -> tuple[bytes, Message]:
    message = train_message(model_to_record(MODEL),
                            **{CODEC_KEY: CODEC, "server-round": server_round})
    reply = app(message, context)
    assert not reply.has_error(), reply.error
    record: ArrayRecord = reply.content["arrays"]
    assert list(record.keys()) == [UPDATE_KEY]
    return packed_bytes(record[UPDATE_KEY], 1 << 26), reply


def test_the_runtime_runs_the_module_level_app_itself() -> None:
    assert load_client_app(DEFAULT_APP_REF) is client_app.app
    assert compression_mod in client_app.FEDGE_MODS


def test_fedges_app_compresses_and_a_second_mod_does_not_compress_again(caplog) -> None:
    outer = ClientApp(mods=[compression_mod])  # a user's app calling fedge's from its handler
    outer.train()(lambda message, context: client_app.app(message, context))
    apps = {
        "once": client_app.app,
        "twice": client_app.make_client_app(mods=[compression_mod, *client_app.FEDGE_MODS]),
        "nested": outer,
    }
    contexts = {name: make_context(pid=1) for name in apps}
    sent: dict[str, list[bytes]] = {name: [] for name in apps}
    with caplog.at_level("WARNING", logger="fedge.client.compression_mod"):
        for server_round in (1, 2):  # round 2 starts from round 1's residual
            for name, app in apps.items():
                sent[name].append(_train(app, contexts[name], server_round)[0])
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    update = decode_update(sent["once"][1], expected=LAYOUT)
    assert update.codec == CODEC and update.is_delta and update.round == 2
    # one encoding of the same delta, byte for byte, with the residual applied once
    assert sent["twice"] == sent["once"] and sent["nested"] == sent["once"]
    for ctx in contexts.values():
        assert list(ctx.state.array_records) == [RESIDUAL_STATE_KEY]
