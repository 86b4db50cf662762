"""LoRA under torch DistributedDataParallel, two CPU processes (gloo).

Keras's distribution API is JAX-only; on PyTorch a Keras model is a
`torch.nn.Module`, so the PyTorch way applies: wrap the adapted model in
`DistributedDataParallel` and train with a torch loop. Each process takes
half of the batch; the result must equal one process on the whole batch.
Prints one JSON line; `tests/test_distribution.py` asserts on it.
"""

import os

os.environ["KERAS_BACKEND"] = "torch"

import json  # noqa: E402
import socket  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import keras_lora  # noqa: E402

WORLD_SIZE, STEPS, BATCH = 2, 5, 32


def make_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="tanh", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    return keras_lora.apply_lora(model, rank=2)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 8)).astype("float32")
    return x, x @ rng.normal(size=(8, 3)).astype("float32")


def train(module, model, x, y):
    """SGD on the adapters only; returns the losses."""
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(adapters, lr=0.1)
    x, y = torch.tensor(x), torch.tensor(y)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.mean((module(x) - y) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return len(adapters), losses


def adapters(model):
    return {
        variable.path: keras.ops.convert_to_numpy(variable)
        for layer in keras_lora.lora_layers(model).values()
        for variable in (layer.lora_a, layer.lora_b)
    }


def worker(rank, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = data()
    shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    trainable, losses = train(ddp, model, x[shard], y[shard])
    queue.put((rank, trainable, losses, adapters(model)))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = mp.spawn(
        worker,
        args=(free_port(), queue),
        nprocs=WORLD_SIZE,
        join=False,
    )
    results = sorted(
        (queue.get(timeout=600) for _ in range(WORLD_SIZE)),
        key=lambda result: result[0],
    )
    processes.join()
    trainable = results[0][1]
    # Equal shards: the mean of the shard losses is the whole-batch loss.
    ddp_losses = np.mean([result[2] for result in results], axis=0).tolist()
    ddp_adapters = results[0][3]
    replicas_agree = all(
        np.array_equal(result[3][k], ddp_adapters[k])
        for result in results
        for k in ddp_adapters
    )
    model = make_model()
    initial = adapters(model)
    _, single_losses = train(model, model, *data())
    single = adapters(model)
    print(
        json.dumps(
            {
                "trainable_tensors": trainable,
                "ddp_losses": ddp_losses,
                "replicas_agree": bool(replicas_agree),
                "single_losses": single_losses,
                "adapter_max_diff": float(
                    max(
                        np.max(np.abs(ddp_adapters[k] - single[k]))
                        for k in single
                    )
                ),
                "adapter_change": float(
                    max(np.max(np.abs(single[k] - initial[k])) for k in single)
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
