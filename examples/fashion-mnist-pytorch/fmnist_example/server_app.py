"""fmnist_example: the ServerApp (FedAvg, central evaluation on the test set)."""

import json
import time
from collections.abc import Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fedge.flower import Compressed
from fmnist_example.task import load_test, new_model, test

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    lr = float(cfg["learning-rate"])
    seed = int(cfg["seed"])

    # Initial global model: the same for the same seed, in every runtime
    arrays = ArrayRecord(new_model(seed).state_dict())

    # FedAvg over every node each round; fedge decodes the int8 replies it gets
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=float(cfg["fraction-evaluate"]))
    strategy = Compressed(strategy, codec=str(cfg["codec"]))

    meter = UplinkMeter(strategy, fp32_bytes=sum(a.nbytes for a in arrays.to_numpy_ndarrays()))
    report = RoundReport(str(cfg["metrics-path"]), meter)
    test_set = load_test(str(cfg["data-dir"]), int(cfg["test-samples"]))

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate the global model on the central test set, and report the round."""
        model = new_model(seed)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, test_set)
        report.round(server_round, accuracy, loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    meter.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )


class UplinkMeter(Strategy):
    """Counts the bytes of the arrays each train reply carried, then hands it on.

    It sits outside every other wrapper, so it sees replies as they crossed
    the wire (int8 updates with fedge, fp32 weights without). `fp32_bytes`
    is the model's size in fp32: the uplink of one uncompressed reply.
    """

    def __init__(self, strategy: Strategy, fp32_bytes: int) -> None:
        self.strategy = strategy
        self.fp32_bytes = fp32_bytes
        self.uplink: dict[int, tuple[int, int]] = {}  # round -> (bytes, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self._count(server_round, replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _count(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        total, count = 0, 0
        for msg in replies:  # one at a time: a streaming aggregator stays streaming
            if msg.has_content():
                total += sum(len(a.data) for rec in msg.content.array_records.values()
                             for a in rec.values())
                count += 1
            self.uplink[server_round] = (total, count)
            yield msg


class RoundReport:
    """One JSON line per round (accuracy, uplink bytes, the fp32 size) when a path is set."""

    def __init__(self, path: str, meter: UplinkMeter) -> None:
        self.path = path
        self.meter = meter
        self.started = time.monotonic()

    def round(self, server_round: int, accuracy: float, loss: float) -> None:
        uplink, replies = self.meter.uplink.get(server_round, (0, 0))
        line = {"round": server_round, "accuracy": accuracy, "loss": loss,
                "uplink-bytes": uplink, "replies": replies,
                "fp32-bytes": replies * self.meter.fp32_bytes,
                "seconds": round(time.monotonic() - self.started, 3)}
        print(f"round {server_round}: accuracy {accuracy:.4f}, uplink {uplink} B")
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
