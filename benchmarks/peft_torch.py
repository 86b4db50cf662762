"""keras-lora on the torch backend vs Hugging Face PEFT on plain PyTorch.

The same MLP four ways, interleaved in one process: keras-lora and full
fine-tuning through Keras (torch backend, `jit_compile=False`, as PEFT
runs eagerly too), and PEFT LoRA and full fine-tuning on an `nn.Linear`
stack with `torch.optim.Adam`.
"""

import keras

from benchmarks import timing
from benchmarks import training
from benchmarks import variants
from benchmarks import workloads

from benchmarks.names import PEFT_KERAS_FULL as KERAS_FULL
from benchmarks.names import PEFT_KERAS_LORA as KERAS_LORA
from benchmarks.names import PEFT_LORA
from benchmarks.names import TORCH_FULL


def torch_mlp(sizes):
    """An `nn.Sequential` of Linear/ReLU matching `workloads.build_mlp`."""
    import torch

    torch.manual_seed(0)
    modules = []
    for i in range(sizes.mlp_depth):
        modules.append(torch.nn.Linear(sizes.mlp_width, sizes.mlp_width))
        if i < sizes.mlp_depth - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def peft_mlp(sizes):
    """`torch_mlp` with PEFT LoRA (rank `sizes.rank`) on every Linear."""
    import peft
    import torch

    model = torch_mlp(sizes)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    config = peft.LoraConfig(
        r=sizes.rank,
        lora_alpha=sizes.rank,
        lora_dropout=0.0,
        target_modules=names,
    )
    return peft.get_peft_model(model, config)


def torch_step_fn(model, x, y):
    """One eager PyTorch training step (Adam, MSE)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def run(sizes, log):
    """The four-way comparison; skipped off the torch backend."""
    if keras.backend.backend() != "torch":
        return {"status": "skipped", "reason": "runs on the torch backend only"}
    try:
        import peft  # noqa: F401
    except ImportError as error:
        reason = f"peft is not importable ({error})"
        log(f"  skipped: {reason}")
        return {"status": "skipped", "reason": reason}
    x, y = workloads.mlp_batch(sizes)
    lora_model, note = variants.build(
        workloads.MLP, variants.KERAS_LORA, workloads.ALL_LINEAR, sizes
    )
    full_model, _ = variants.build(
        workloads.MLP, variants.FULL, workloads.ALL_LINEAR, sizes
    )
    steps = {
        KERAS_LORA: training.train_step_fn(
            training.compiled(lora_model, False), x, y
        ),
        KERAS_FULL: training.train_step_fn(
            training.compiled(full_model, False), x, y
        ),
        PEFT_LORA: torch_step_fn(peft_mlp(sizes), x, y),
        TORCH_FULL: torch_step_fn(torch_mlp(sizes), x, y),
    }
    times = timing.interleave(steps, sizes.warmup, sizes.repeats)
    result = {
        "status": "ok",
        "median_ms": {k: timing.median_ms(v) for k, v in times.items()},
        "ratios": {
            f"{KERAS_LORA}/{PEFT_LORA}": timing.paired_ratio(
                times[KERAS_LORA], times[PEFT_LORA]
            ),
            f"{KERAS_FULL}/{TORCH_FULL}": timing.paired_ratio(
                times[KERAS_FULL], times[TORCH_FULL]
            ),
            f"{PEFT_LORA}/{TORCH_FULL}": timing.paired_ratio(
                times[PEFT_LORA], times[TORCH_FULL]
            ),
            f"{KERAS_LORA}/{KERAS_FULL}": timing.paired_ratio(
                times[KERAS_LORA], times[KERAS_FULL]
            ),
        },
        "notes": [note] if note else [],
    }
    log(
        "  "
        + " ".join(f"{k}={v:.0f}ms" for k, v in result["median_ms"].items())
        + " | "
        + " ".join(f"{k}={v:.2f}" for k, v in result["ratios"].items())
    )
    return result
