"""fmnist_example: the ClientApp (trains on this node's partition)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.flower import compression_mod
from fmnist_example.task import Net, load_partition
from fmnist_example.task import train as train_fn

# Flower ClientApp, with fedge's compression mod: the reply's weights go back int8-encoded
app = ClientApp(mods=[compression_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())

    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    cfg = context.run_config
    seed = int(cfg["seed"])
    dataset = load_partition(str(cfg["data-dir"]), partition_id, num_partitions,
                             int(cfg["samples-per-client"]), seed)
    server_round = int(msg.content["config"]["server-round"])
    train_loss = train_fn(
        model,
        dataset,
        int(cfg["local-epochs"]),
        float(msg.content["config"]["lr"]),
        int(cfg["batch-size"]),
        seed=seed * 100_003 + partition_id * 1_009 + server_round,
    )

    model_record = ArrayRecord(model.state_dict())
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(dataset)})
    content = RecordDict({"arrays": model_record, "metrics": metrics})
    return Message(content=content, reply_to=msg)
