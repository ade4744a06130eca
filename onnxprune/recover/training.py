"""Fine-tuning a (pruned) ONNX model's weights in torch, written back into the initializers.

Rules :func:`finetune` follows:

- The model is evaluated by :class:`~onnxprune.executor.graph_module.TorchGraph`; the
  initializers that are real weights (:func:`trainable_initializers`) are trained, every
  other float constant (Resize scales, Clip bounds, shape-like constants, BN running
  statistics) stays fixed; integer constants are never parameters.
- BatchNormalization stays in inference mode (ONNX BN is the inference op): its running
  mean / variance are frozen, its scale (gamma) and bias (beta) are trained. Training the
  statistics on a few hundred samples would make them noisy; re-estimating them is what
  :func:`onnxprune.recover.bn.recalibrate_bn` does (``--recalibrate-bn``, run before
  fine-tuning so training starts from, and adapts to, the re-estimated statistics).
- Loss (:func:`onnxprune.criteria.loss.resolve_loss`): ``auto`` is cross-entropy with
  labels; without labels distillation from the teacher (the original model, evaluated
  under ``no_grad``): KL of the softmax for classifiers ([N, classes] first output),
  variance-normalised MSE over every float output otherwise. ``temperature`` T softens
  both softmaxes of ``kl`` and scales the loss by T^2 (Hinton et al., "Distilling the
  Knowledge in a Neural Network", 2015); the default T = 1 is the plain KL of issue 3.
- Batches of ``batch_size`` samples drawn in a seeded random order each epoch; only the
  current batch and its teacher outputs live on the device; ceil(N / batch_size) steps
  per epoch. A model whose input has a fixed batch dim B (exports with batch 1 often
  hard-code it in a Reshape) runs each step's batch in micro-batches of B
  (:mod:`onnxprune.batching`: the last one padded, padding dropped from the outputs), and
  the loss is that of the whole step's batch, so the step is the one a free-batch model
  takes, for any B and batch_size (B > batch_size and N < B included); the student and
  the teacher each use their own fixed batch.
- Optimizers ``sgd`` (momentum 0.9), ``adam``, ``adamw``; schedule ``cosine`` (from lr to
  0 over all steps, per step) or ``constant``, after an optional linear warm-up over the
  first ``warmup`` fraction of the steps (from lr / 10).
- Consistent augmentation (``augment``, :mod:`onnxprune.recover.augment`): each batch is
  augmented once and the *same* view goes to the teacher and the student (Beyer et al.,
  CVPR 2022); mixing kinds only with a teacher loss. The augmentation runs where the batch
  is read (the DataLoader's worker processes for lazy data, :mod:`onnxprune.data.loader`),
  seeded per batch from (seed, epoch, step): the same views for any ``--workers``.
- Data: per step, an index array (a chunk of the epoch's seeded permutation, sorted) is
  read as one batch (:func:`onnxprune.data.fetch_batches`); bad samples of lazy sources
  are dropped from it (a batch left empty takes no step), and the loss is the mean over
  the samples read.
- Early stopping on held-out data (``validate``): the model as given and the model after
  every epoch are scored by ``validate`` (higher is better); the best is returned, and
  training stops after ``patience`` epochs without improvement. So fine-tuning never
  returns a model worse on the held-out data than the one it started from. Defaults (adam, lr 1e-4, no weight decay)
  are the cautious choice for a short recovery of a pretrained model.
- Nothing is written here: the trained model is returned (the callers save it atomically
  with :func:`onnxprune.io.save_model` only after training completed), so a Ctrl-C or an
  exception during training leaves no file behind.
- Multi-process runs (:mod:`onnxprune.distributed`, torchrun or ``--nproc``): the global
  batch stays ``batch_size`` and its order the one-process order; each step's sorted
  index array ``idx`` is split by rank (``idx[rank::world]``), each rank's mean loss is
  weighted by its share of ``idx``, and the model is wrapped in DistributedDataParallel
  (the TorchGraph is an ``nn.Module``), whose gradient all-reduce then gives every rank
  the gradient of one process's step (float tolerance); the ``mse`` loss divides by the
  variance of the whole global batch's reference (all-reduced). The loss shown, the
  divergence check, early stopping (``validate`` is evaluated on rank 0 and broadcast)
  and the returned model are the same on every rank. Augmentation draws its views per
  rank (mixup / cutmix mix within a rank's part), so with ``augment`` a run is
  statistically equivalent, not equal, to one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from onnxprune.batching import fixed_batch, forward_fixed, require_one_input, run_in_fixed_batches, value_info_dims
from onnxprune.criteria.calibration import first_output_rank
from onnxprune.criteria.loss import Loss, resolve_loss
from onnxprune.data import BatchRequest, CalibrationData, Fetched, batch_seed, fetch_batches
from onnxprune.distributed import DistContext, current, fault_point
from onnxprune.errors import DataError, OnnxPruneError, UnsupportedModelError
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.inputs import graph_inputs

__all__ = ["FinetuneOptions", "FinetuneResult", "OPTIMIZERS", "SCHEDULES", "check_teacher", "finetune",
           "trainable_initializers"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")

#: op type -> input positions that hold weights (when they are float initializers)
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,),
}


@dataclass(frozen=True)
class FinetuneOptions:
    """Options of :func:`finetune` (see the module docstring for the defaults' reasons).

    Attributes:
        epochs: passes over the data (>= 1).
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
        lr: peak learning rate (> 0).
        schedule: ``cosine`` (decays to 0 over all steps) or ``constant``.
        weight_decay: L2 (adam, sgd) or decoupled (adamw) weight decay (>= 0).
        batch_size: samples per step (>= 1); bounds memory.
        loss: ``auto``, ``ce``, ``kl`` or ``mse`` (:mod:`onnxprune.criteria.loss`).
        temperature: softmax temperature of ``kl`` distillation (> 0).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seed of the batch order and of the augmentation.
        progress: show a rich progress bar on stderr.
        warmup: fraction of the steps with a linear learning-rate warm-up, in [0, 1).
        augment: consistent augmentation: ``("auto",)``, ``("none",)`` or kinds
            (:func:`onnxprune.recover.augment.parse_augment`; ``auto`` resolved by the
            model's first output).
        patience: with ``validate``, stop after this many epochs without improvement
            (None: run every epoch, still returning the best).

    Raises:
        OnnxPruneError: an option out of range, naming it.
    """

    epochs: int = 1
    optimizer: str = "adam"
    lr: float = 1e-4
    schedule: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 32
    loss: str = "auto"
    temperature: float = 1.0
    device: str = "auto"
    seed: int = 0
    progress: bool = False
    warmup: float = 0.0
    augment: tuple[str, ...] = ()
    patience: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", tuple(self.augment))
        if self.augment:
            from onnxprune.recover.augment import parse_augment

            parse_augment(list(self.augment), classifier=True)  # unknown kinds fail here, named
        if not (math.isfinite(self.warmup) and 0 <= self.warmup < 1):
            raise OnnxPruneError(f"--warmup must lie in [0, 1), got {self.warmup}")
        if self.patience is not None and int(self.patience) < 1:
            raise OnnxPruneError(f"--patience must be >= 1, got {self.patience}")
        if int(self.epochs) < 1:
            raise OnnxPruneError(f"--epochs must be >= 1, got {self.epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise OnnxPruneError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise OnnxPruneError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OnnxPruneError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise OnnxPruneError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if int(self.batch_size) < 1:
            raise OnnxPruneError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise OnnxPruneError(f"--temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes:
        model: copy of the student with the trained weights in its initializers.
        loss: the resolved loss kind (``ce``, ``kl``, ``mse``).
        loss_before / loss_after: mean loss over the data before and after training
            (no-grad passes in data order), None unless ``measure_loss``.
        epoch_losses: mean training loss of each epoch (float, as seen while training).
        steps: optimizer steps taken.
        trained: names of the trained initializers.
        device: torch device used.
        seconds: wall time of the training loop.
    """

    model: onnx.ModelProto
    loss: str
    loss_before: float | None
    loss_after: float | None
    epoch_losses: tuple[float, ...]
    steps: int
    trained: tuple[str, ...]
    device: str
    seconds: float
    extra: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "loss_before": self.loss_before, "loss_after": self.loss_after,
                "epoch_losses": list(self.epoch_losses), "steps": self.steps, "trained": len(self.trained),
                "device": self.device, "seconds": self.seconds, **dict(self.extra)}


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """Float initializers that are weights, in initializer order.

    A float initializer is a weight when a node reads it at a weight position: Conv /
    ConvTranspose W and B; Gemm A, B, C; MatMul operands; BatchNormalization / Instance-
    / Layer- / GroupNormalization scale and bias (not BN's running statistics); PRelu
    slope; or as the constant operand, with more than one element, of an Add or Mul
    whose other operand is not a graph input (per-channel scale / shift layers, MatMul
    biases; not the input normalisation of a preprocessing block). Everything else
    (scalars, Resize scales, Clip bounds, Pad values, shape-like floats) stays fixed.
    """
    floats = {t.name: t for t in model.graph.initializer
              if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), np.floating)}
    inputs = {i.name for i in graph_inputs(model)}
    picked: set[str] = set()
    for node in model.graph.node:
        slots = _WEIGHT_INPUTS.get(node.op_type)
        if slots is not None:
            picked.update(node.input[i] for i in slots if i < len(node.input) and node.input[i] in floats)
        elif node.op_type in ("Add", "Mul") and len(node.input) == 2:
            for i, name in enumerate(node.input):
                other = node.input[1 - i]
                if name in floats and other not in floats and other not in inputs \
                        and int(np.prod(floats[name].dims)) > 1:
                    picked.add(name)
    return [name for name in floats if name in picked]


def _fmt(dims: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def check_teacher(student: onnx.ModelProto, teacher: onnx.ModelProto, *, student_label: str = "model",
                  teacher_label: str = "teacher") -> None:
    """Check that ``teacher`` takes the student's inputs and gives its outputs.

    Same graph input names in the same order, no fixed dim (other than the batch) that
    differs, and the same output names with the same rank and no fixed dim other than
    dim 0 that differs (dims unknown on either side are not compared).

    Raises:
        OnnxPruneError: the first difference, naming both labels, the tensor and the shapes.
    """
    si, ti = graph_inputs(student), graph_inputs(teacher)
    if [i.name for i in si] != [i.name for i in ti]:
        raise OnnxPruneError(f"{teacher_label}: inputs {[i.name for i in ti]} differ from the inputs of "
                             f"{student_label} {[i.name for i in si]}")
    for a, b in zip(si, ti):
        da, db = value_info_dims(a) or [], value_info_dims(b) or []
        if da and db and (len(da) != len(db) or any(
                x is not None and y is not None and x != y for x, y in list(zip(da, db))[1:])):
            raise OnnxPruneError(f"{teacher_label}: input {a.name!r} has shape {_fmt(db)}, but {student_label} "
                                 f"takes {_fmt(da)}; the teacher must be the model {student_label} was pruned from")
    so, to = list(student.graph.output), list(teacher.graph.output)
    if [o.name for o in so] != [o.name for o in to]:
        raise OnnxPruneError(f"{teacher_label}: outputs {[o.name for o in to]} differ from the outputs of "
                             f"{student_label} {[o.name for o in so]}")
    for a, b in zip(so, to):
        da, db = value_info_dims(a) or [], value_info_dims(b) or []
        if da and db and len(da) != len(db):
            raise OnnxPruneError(f"{teacher_label}: output {a.name!r} has rank {len(db)}, {student_label}'s "
                                 f"has rank {len(da)}")
        if da and db and any(x is not None and y is not None and x != y for x, y in list(zip(da, db))[1:]):
            raise OnnxPruneError(f"{teacher_label}: output {a.name!r} has shape {_fmt(db)}, but {student_label}'s "
                                 f"is {_fmt(da)}; the teacher must be the model {student_label} was pruned from")


def _optimizer(params: list[torch.nn.Parameter], opts: FinetuneOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[loss]}"), console=Console(stderr=True), disable=not enabled,
                    transient=False)


def finetune(student: onnx.ModelProto, data: CalibrationData, *, teacher: onnx.ModelProto | None = None,
             options: FinetuneOptions = FinetuneOptions(),
             callback: Callable[[int, int, float], None] | None = None,
             measure_loss: bool = True,
             validate: Callable[[onnx.ModelProto], float] | None = None) -> FinetuneResult:
    """Train ``student``'s weights on ``data``; return a copy with the trained initializers.

    Args:
        student: the (pruned) canonical model, one graph input; not modified. float16 /
            bfloat16 weights are trained in float32 and written back in their own dtype.
        data: inputs float32 [N, ...] in the model's input layout, optional int64 labels [N].
        teacher: the original model (distillation target, pseudo-labels); required
            without labels. Evaluated under ``torch.no_grad`` on the same batches.
        options: see :class:`FinetuneOptions`.
        callback: called after every step with (epoch, step within the epoch, loss);
            an exception it raises aborts training (nothing is returned or written).
        measure_loss: compute ``loss_before`` / ``loss_after`` with two extra no-grad
            passes over the data (else they are None).
        validate: scores a candidate model (higher is better), e.g. held-out accuracy
            (:class:`onnxprune.holdout.HeldOutMetric`); the best of the input and every
            epoch is returned (``extra``: ``val_by_epoch``, ``best_epoch``, 0 = input).

    Returns:
        :class:`FinetuneResult`.

    Multi-process runs (module docstring): every rank must call this with the same
    arguments; each trains on its part of every step's batch and all return the same model.

    Raises:
        OnnxPruneError: no samples, no labels and no teacher, several graph inputs, a
            loss the outputs cannot take, a teacher whose interface differs, a
            non-finite loss (lower the learning rate); UnsupportedModelError: an op the
            torch executor lacks; DistributedError: another rank failed.
    """
    from onnxprune.executor.device import resolve_device

    if len(data) == 0:
        raise OnnxPruneError("fine-tuning needs at least one calibration sample")
    if teacher is None and data.y is None:
        raise OnnxPruneError("fine-tuning without labels needs the original model as teacher (--teacher)")
    if teacher is not None:
        check_teacher(student, teacher)
    loss_fn = resolve_loss(options.loss, has_labels=data.y is not None, first_output_rank=first_output_rank(student))
    if loss_fn.uses_teacher and teacher is None:
        raise OnnxPruneError(f"loss {loss_fn.kind} needs the original model as teacher (--teacher)")
    device = resolve_device(options.device)
    names = trainable_initializers(student)
    if not names:
        raise OnnxPruneError("the model has no float weights to fine-tune")
    net = TorchGraph(student, requires_grad=False).to(device)
    require_one_input(net.input_names, "fine-tuning")
    params = [net.parameter(n) for n in names]
    odd = sorted({str(p.dtype) for p in params} - {"torch.float32", "torch.float64"})
    if odd:
        raise UnsupportedModelError(f"fine-tuning needs float32 weights, the model has {', '.join(odd)} weights")
    for p in params:
        p.requires_grad_(True)
    ctx = current()
    if validate is not None:
        validate = ctx.on_main(validate)  # rank 0 measures, every rank takes the same decision
    tnet = None
    if teacher is not None:
        tnet = TorchGraph(teacher, requires_grad=False).to(device).eval()

    fixed = fixed_batch(student)  # each graph runs in micro-batches of its own fixed batch
    tfixed = None if teacher is None else fixed_batch(teacher)
    gen = torch.Generator().manual_seed(int(options.seed))
    bs = int(options.batch_size)
    n = len(data)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * int(options.epochs)
    opt = _optimizer(params, options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(options.schedule, total,
                                                            int(round(options.warmup * total))))
    augment = None
    if options.augment:
        from onnxprune.recover.augment import Augmenter, parse_augment

        kinds = parse_augment(list(options.augment), classifier=first_output_rank(student) == 2)
        augment = Augmenter(kinds, allow_mixing=loss_fn.uses_teacher) if kinds else None

    def requests(chunks: list[np.ndarray], epoch: int | None = None) -> list[BatchRequest]:
        """One read per step; training batches carry their augmentation seed (seed, epoch, step)."""
        aug = epoch is not None and augment is not None
        return [BatchRequest(idx, batch_seed(options.seed, epoch, k) if aug else None) for k, idx in enumerate(chunks)]

    def fetched(chunks: list[np.ndarray], epoch: int | None = None):
        """(idx, batch, local count, global count) per step. Each rank reads only its part
        ``idx[rank::world]`` of the step's batch ``idx`` (in worker processes for lazy data;
        bad samples dropped; augmented there for training, one view for the student and the
        teacher alike); the counts are the good samples read here and by all ranks. A rank
        whose part is empty reads ``idx[:1]`` as a stand-in and counts 0 (it still joins
        DDP's gradient all-reduce, with weight 0)."""
        parts = [ctx.split(c) for c in chunks]
        stand_in = [len(p) == 0 for p in parts]
        reads = [c[:1] if empty else p for c, p, empty in zip(chunks, parts, stand_in)]
        reqs = requests(reads, epoch)
        if ctx.world > 1 and epoch is not None and augment is not None:  # each rank its own views
            reqs = [BatchRequest(r.index, batch_seed(options.seed, epoch, k, ctx.rank)) for k, r in enumerate(reqs)]
        batches = fetch_batches(data, reqs, augment=augment if epoch is not None else None, check_all_bad=False)
        good = 0
        for idx, f, empty in zip(chunks, batches, stand_in):
            mine = 0 if empty else len(f.x)
            everyone = int(ctx.all_reduce_sum(mine))
            good += everyone
            yield idx, f, mine, everyone
        if not good:  # the same on every rank: all fail together, naming the files
            raise DataError(f"{data.source}: every sample read for fine-tuning is bad; the first: "
                            f"{', '.join(data.bad.names) or 'none named'}")

    def first_good() -> Fetched:
        """The first good sample of the data, read alone (no worker processes)."""
        for i in range(n):
            g = next(fetch_batches(data, [BatchRequest(np.array([i]), None)], check_all_bad=False))
            if len(g.x):
                return g
        raise DataError(f"{data.source}: every sample is bad; the first: {', '.join(data.bad.names) or 'none named'}")

    def inputs(f: Fetched):
        """(x, y, teacher outputs) of a batch as tensors; a batch left empty by bad samples
        becomes the first good sample of the data (a weight-0 stand-in for the collectives)."""
        fx, fy = f.x, f.y
        if not len(fx):  # a real sample (a zero input may give a non-finite loss, and 0 * NaN is NaN)
            good = first_good()
            fx, fy = good.x[:1], None if good.y is None else good.y[:1]
        x = torch.from_numpy(fx).to(device)
        y = None if fy is None else torch.from_numpy(fy).to(device)
        ref = None
        if tnet is not None:
            with torch.no_grad():
                ref = tuple(t.detach() for t in forward_fixed(tnet, x, tfixed))
        return x, y, ref

    model = net  # what a training step runs: net, or DDP around it
    if ctx.world > 1:
        def probe() -> torch.Tensor:  # one sample's loss, the same on every rank, no collective
            x, y, ref = inputs(first_good())
            return _loss(loss_fn, forward_fixed(net, x, fixed), y, ref, options.temperature)

        model = _data_parallel(net, device, params, probe)

    def loss_on(f: Fetched, weight: float) -> torch.Tensor:
        """This rank's term of the mean loss of one step's batch, run as the model can take
        it: the mean loss of the samples it read times ``weight``, their share of the
        samples all ranks read (the terms add up to one process's loss; 1 at world 1)."""
        x, y, ref = inputs(f)
        if model is net or not torch.is_grad_enabled():
            outs = forward_fixed(net, x, fixed)
        else:  # DDP around net: a module without net's output names
            outs = tuple(run_in_fixed_batches(model, x, fixed, net.output_names))
        scales = None
        if ctx.world > 1 and loss_fn.kind == "mse":
            scales = _global_scales(outs, ref, ctx, counted=weight > 0)
        return _loss(loss_fn, outs, y, ref, options.temperature, scales) * weight

    def mean_loss() -> float:
        total_loss, count = 0.0, 0
        with torch.no_grad():
            for _, f, mine, everyone in fetched([np.arange(i, min(i + bs, n)) for i in range(0, n, bs)]):
                if everyone:
                    total_loss += float(ctx.all_reduce_sum(float(loss_on(f, mine / everyone)))) * everyone
                    count += everyone
        return total_loss / max(count, 1)

    loss_before = mean_loss() if measure_loss else None
    val_by_epoch: list[float] = []
    best_model, best_epoch = student, 0
    if validate is not None:
        val_by_epoch.append(float(validate(student)))
    epoch_losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    with _progress(options.progress and ctx.is_main) as bar:
        task = bar.add_task("fine-tune", total=total, loss="")
        for epoch in range(int(options.epochs)):
            order = torch.randperm(n, generator=gen).numpy()
            running, seen = 0.0, 0
            chunks = [np.sort(order[i:i + bs]) for i in range(0, n, bs)]
            for k, (idx, f, mine, everyone) in enumerate(fetched(chunks, epoch)):
                fault_point("finetune")
                if not everyone:  # every sample of the batch was bad (counted, warned), on every rank
                    bar.update(task, advance=1)
                    continue
                opt.zero_grad(set_to_none=True)
                loss = loss_on(f, mine / everyone)
                if ctx.world == 1:
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise OnnxPruneError(f"fine-tuning diverged at epoch {epoch + 1}, step {k + 1} "
                                             f"(loss {value}); lower --lr")
                    loss.backward()
                else:
                    # the global batch's loss, the same on every rank, summed while the step runs
                    total_loss = ctx.all_reduce_sum_async(float(loss.detach()))
                    # DDP averages the ranks' gradients: the mean of world * share_r * grad_r is
                    # sum_r share_r * grad_r, the gradient of one process's loss on the batch
                    with ctx.collectives("the gradient all-reduce"):
                        (loss * ctx.world).backward()
                    value = total_loss()
                    if not math.isfinite(value):  # every rank stops here, before the step
                        raise OnnxPruneError(f"fine-tuning diverged at epoch {epoch + 1}, step {k + 1} "
                                             f"(loss {value}); lower --lr")
                opt.step()
                sched.step()
                step += 1
                running += value * everyone
                seen += everyone
                bar.update(task, advance=1, description=f"fine-tune epoch {epoch + 1}/{options.epochs}",
                           loss=f"loss {running / seen:.4g}")
                if callback is not None:
                    callback(epoch, k, value)
            epoch_losses.append(running / max(seen, 1))
            if validate is not None:
                candidate = net.write_back(student)
                val_by_epoch.append(float(validate(candidate)))
                if val_by_epoch[-1] > val_by_epoch[best_epoch]:
                    best_model, best_epoch = candidate, epoch + 1
                elif options.patience is not None and epoch + 1 - best_epoch >= int(options.patience):
                    break
    seconds = time.perf_counter() - t0
    if step == 0:  # every batch bad is a DataError above; never report an untrained model as fine-tuned
        raise OnnxPruneError("fine-tuning took no step")
    loss_after = mean_loss() if measure_loss else None
    for p in params:
        p.requires_grad_(False)
    if ctx.world > 1:
        model = net  # drops DDP (and its hooks on the parameters)
        import gc

        gc.collect()  # DDP sits in reference cycles that hold the process group; free it now, not at exit
    extra: dict = {}
    if validate is not None:
        trained = best_model
        extra = {"val_by_epoch": val_by_epoch, "best_epoch": best_epoch}
    else:
        trained = net.write_back(student)
    if ctx.world > 1:
        extra["processes"] = ctx.world
    return FinetuneResult(trained, loss_fn.kind, loss_before, loss_after, tuple(epoch_losses), step,
                          tuple(names), str(device), seconds, extra)


def lr_factor(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at step ``s`` (``LambdaLR``'s function).

    Linear warm-up from 0.1 to 1 over the first ``warmup`` steps, then ``cosine`` (to 0 at
    step ``total``) or ``constant``.
    """
    total = max(int(total), 1)
    warmup = min(max(int(warmup), 0), total - 1)

    def f(s: int) -> float:
        if s < warmup:
            return 0.1 + 0.9 * s / warmup
        if schedule == "cosine":
            rest = max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(s - warmup, rest) / rest))
        return 1.0

    return f


def _loss(loss_fn: Loss, outputs, y, ref, temperature: float, scales=None) -> torch.Tensor:
    """``loss_fn`` with the ``kl`` temperature applied (T^2-scaled, Hinton et al. 2015);
    ``scales``: the ``mse`` variances (:func:`_global_scales`) or None."""
    if loss_fn.kind == "kl" and temperature != 1.0:
        t = float(temperature)
        outs = (outputs[0] / t,) + tuple(outputs[1:])
        refs = (ref[0] / t,) + tuple(ref[1:])
        return loss_fn(outs, y, refs) * (t * t)
    if scales is not None:
        return loss_fn(outputs, y, ref, scales=scales)
    return loss_fn(outputs, y, ref)


def _data_parallel(net: TorchGraph, device: str, params: list[torch.nn.Parameter],
                   probe: Callable[[], torch.Tensor]) -> torch.nn.Module:
    """``net`` in DistributedDataParallel (gradients averaged over the ranks during backward).

    A trainable initializer may not reach the loss (a constant that only feeds a
    comparison or a shape, an output the loss ignores): DDP would wait for its gradient
    forever. ``probe()`` (one sample's loss) finds them: they are set to
    ``requires_grad=False``, as one process leaves their gradient None (the optimizer
    skips them either way), so DDP needs no per-step search for unused parameters (an
    ONNX graph evaluated by TorchGraph has no data-dependent control flow).
    """
    from torch.nn.parallel import DistributedDataParallel

    grads = torch.autograd.grad(probe(), params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is None:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in params):  # nothing reaches the loss: no gradient to share
        return net
    dev = torch.device(device)
    with current().collectives("DistributedDataParallel's start"):
        return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)


def _global_scales(outputs, reference, ctx: DistContext, *, counted: bool) -> list[torch.Tensor]:
    """The ``mse`` loss's variance of each floating-point reference output over the whole
    global batch (every rank's part; one process computes it on the batch it holds).

    Exact two-pass combination in float64 (counts and sums, then squared deviations about
    the global mean); ``counted`` False: this rank's part is a stand-in sample and adds
    nothing. Floored at 1e-12, 1.0 for a single element, as for one process.

    Raises:
        DistributedError: another rank failed.
    """
    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    refs = (reference,) if isinstance(reference, torch.Tensor) else tuple(reference)
    pairs = [r.detach() for o, r in zip(outs, refs) if o.is_floating_point()]
    first = np.zeros(2 * len(pairs), dtype=np.float64)
    if counted:
        for i, r in enumerate(pairs):
            first[2 * i], first[2 * i + 1] = r.numel(), float(r.double().sum())
    first = ctx.all_reduce_sum(first)
    means = first[1::2] / np.maximum(first[0::2], 1)
    dev = np.zeros(len(pairs), dtype=np.float64)
    if counted:
        for i, r in enumerate(pairs):
            dev[i] = float(((r.double() - means[i]) ** 2).sum())
    dev = ctx.all_reduce_sum(dev)
    out = []
    for i, r in enumerate(pairs):
        count = first[2 * i]
        var = max(dev[i] / count, 1e-12) if count > 1 else 1.0
        # float32 for half types (the floor 1e-12 underflows in float16), as one process's _scale
        dtype = r.dtype if r.dtype in (torch.float32, torch.float64) else torch.float32
        out.append(torch.tensor(var, dtype=dtype, device=r.device))
    return out
