"""Training: a run built from its config, and the loop that fits it.

`build_run` instantiates the data, R replicas of the model (R = parallel_seeds; each replica is
the model built after `torch.manual_seed(seed_k)`, then changed by the regularizers), the
optimizer and the schedule. `fit` trains: every epoch one pass over the training data in
mini-batches [R, B, ...] (`train_step` each; with cuda_graph=true replayed from a CUDA graph, see
dropbench.cuda_graph), then every split evaluated under the regularizers' evaluation rule.
What happens around the loop (result files, checkpoints, resume, signals, progress, trackers)
lives in dropbench.runs and reaches the loop through its `on_epoch` callback.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dropbench.config import UserError, build
from dropbench.cuda_graph import CapturedStep, prepare_optimizer
from dropbench.data import Dataset
from dropbench.models import build_model, model_label
from dropbench.regularizers import Regularizers, build_regularizers
from dropbench.replicas import ReplicaGenerators, Replicas
from dropbench.results import SPLITS

ECE_BINS = 15  # expected calibration error over 15 equal-width confidence bins (Guo et al. 2017)
# A run has diverged when its training loss is not finite or exceeds this multiple of log(C), the
# loss of a model that predicts every class with equal probability.
DIVERGED_LOSS_FACTOR = 100


# torch.optim's fused kernel updates every parameter in one call. On a 2-core CPU it takes 0.13 ms
# off each MNIST-1D Adam step (0.59 vs 0.73 ms with one seed, 1.25 vs 1.42 ms with three); a config
# that sets `fused` or `foreach` keeps its own choice.
FUSED_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")


@dataclass
class Run:
    data: Dataset
    model: Replicas
    regs: Regularizers  # every replica's methods, with PerReplica settings where they differ
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    generators: ReplicaGenerators
    replica_regs: list[Regularizers]  # replica k's methods as its config sets them (for its summary)
    lr_scale: torch.Tensor | None = None  # [R]: lr_k / lr_0, when the replicas' learning rates differ
    loss_sum: torch.Tensor | None = None  # [R]: the epoch's summed training loss, added to by every step
    captured: CapturedStep | None = None  # with cuda_graph=true: the step, replayed from CUDA graphs


def resolve_device(name: str, job_num: int = 0) -> torch.device:
    """The torch device for `device=NAME`. `auto` and `cuda` spread the jobs of a sweep over the
    GPUs this process sees (job n on cuda:(n mod count): a Slurm or CUDA_VISIBLE_DEVICES allocation
    is what it sees); `cuda:N` is that GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if isinstance(name, str) and name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} is not available: PyTorch sees no CUDA GPU here; use device=cpu or auto")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"device={name!r} is not allowed; choose auto, cpu, cuda or cuda:N") from None
        count = torch.cuda.device_count()
        if device.index is None:
            return torch.device("cuda", job_num % count)
        if device.index >= count:
            raise UserError(f"device={name} is not available; this machine has {count} GPU(s)")
        return device
    raise UserError(f"device={name!r} is not allowed; choose auto, cpu, cuda or cuda:N")


def build_run(cfg, device: torch.device, seeds: list[int], replica_cfgs: list | None = None) -> Run:
    """Data, replicas, regularizers, optimizer and schedule from the config. In a folded sweep replica
    k trains seed k with the regularizer and learning rate of its own job's config, replica_cfgs[k]
    (everything else is cfg's, and the same in every replica_cfgs[k]); by default all are cfg."""
    replica_cfgs = replica_cfgs or [cfg] * len(seeds)
    graphed = bool(cfg.get("cuda_graph", False))
    if graphed and device.type != "cuda":
        raise UserError(f"cuda_graph=true needs a CUDA GPU, but this run trains on {device.type}; "
                        f"use device=cuda or cuda_graph=false")
    data: Dataset = build(cfg.dataset, "dataset", device=device)
    if graphed and not data.resident:
        raise UserError(f"cuda_graph=true needs the dataset on the GPU, but {data.name} is larger than "
                        f"dataset.device_budget_gb; raise the budget or use cuda_graph=false")
    generators = ReplicaGenerators(seeds, device)
    replica_regs = [build_regularizers(c.regularizer) for c in replica_cfgs]
    models = []
    for seed, regs in zip(seeds, replica_regs):
        torch.manual_seed(seed)  # built on the CPU: a seed gives the same initial weights on every device
        model = build_model(cfg.model, data.in_shape, data.num_classes)
        models.append(regs.attach(model, generators, model_label(cfg.model)).to(device))
    model = Replicas(models)
    regs = replica_regs[0].folded(replica_regs)
    regs.bind(model)
    optimizer = build(replica_cfgs[0].optimizer, "optimizer", params=model.parameters(),
                      **fused_default(replica_cfgs[0].optimizer))
    scheduler = build(cfg.schedule, "schedule", optimizer=optimizer) if "_target_" in cfg.schedule else None
    prepare_optimizer(optimizer, device, graphed)
    lrs = [float(c.optimizer.lr) for c in replica_cfgs]
    lr_scale = None if len(set(lrs)) == 1 else torch.tensor([lr / lrs[0] for lr in lrs], device=device)
    run = Run(data, model, regs, optimizer, scheduler, generators, replica_regs, lr_scale,
              loss_sum=torch.zeros(len(seeds), device=device))
    if graphed:
        run.captured = CapturedStep(lambda idx: train_step(run, idx), generators.masks, device)
    return run


def fused_default(node) -> dict:
    """fused=True for the torch optimizers that have it, unless the config picks an implementation."""
    chosen = "fused" in node or "foreach" in node
    return {"fused": True} if node.get("_target_") in FUSED_OPTIMIZERS and not chosen else {}


def restore_optimizer(run: Run, optimizer_state: dict, scheduler_state: dict | None) -> None:
    """Load a checkpoint's optimizer and schedule state. The numbers (moments, steps, the learning
    rate the schedule has reached) come from the checkpoint; how the optimizer runs (fused,
    capturable, the learning rate as a tensor for cuda_graph) stays as this run built it, so a run
    checkpointed with cuda_graph=true resumes without it and the other way round."""
    built = [{k: group[k] for k in ("lr", "fused", "foreach", "capturable") if k in group}
             for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(optimizer_state)
    for group, settings in zip(run.optimizer.param_groups, built):
        lr = float(group["lr"])
        group.update(settings)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # the tensor a recorded step reads
        else:
            group["lr"] = lr
    if run.scheduler is not None:
        run.scheduler.load_state_dict(scheduler_state)
        for key in ("base_lrs", "_last_lr"):  # tensors when saved from a cuda_graph run
            if hasattr(run.scheduler, key):
                setattr(run.scheduler, key, [float(v) for v in getattr(run.scheduler, key)])


def train_epoch(run: Run, batch_size: int) -> torch.Tensor:
    """One pass over the training set in [R, B, ...] mini-batches; the summed loss per replica [R]."""
    data = run.data
    run.model.train()
    n = data.size("train")
    order = run.generators.permutations(n).to(data.device if data.resident else "cpu")
    step = run.captured or (lambda idx: train_step(run, idx))
    run.loss_sum.zero_()
    for start in range(0, n, batch_size):
        step(order[:, start:start + batch_size])
    return run.loss_sum.clone()


def train_step(run: Run, idx: torch.Tensor) -> None:
    """One optimizer step of every replica on its examples idx [R, B] of the training split; the
    losses [R] are added to run.loss_sum."""
    x, y = run.data.batch("train", idx)
    loss = run.regs.loss(run.model, x, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()  # replicas are independent: d(sum)/d(loss_r) = 1
    optimizer_step(run)
    run.regs.after_step(run.model)
    run.loss_sum += loss.detach()


def optimizer_step(run: Run) -> None:
    """optimizer.step(). With per-replica learning rates (a folded sweep over lr) the optimizer steps
    with replica 0's and replica k's change is scaled by lr_k / lr_0: the same update for optimizers
    whose step is linear in lr for a given state (SGD, Adam, AdamW; dropbench.fold folds lr only for them)."""
    if run.lr_scale is None:
        run.optimizer.step()
        return
    params = run.model.parameters()
    with torch.no_grad():
        before = [p.detach().clone() for p in params]
        run.optimizer.step()
        for p, b in zip(params, before):
            p.copy_(torch.lerp(b, p, run.lr_scale.view(-1, *([1] * (p.dim() - 1)))))


@torch.no_grad()
def evaluate(run: Run, split: str, batch_size: int) -> dict[str, list[float]]:
    """Per replica, over one split under the evaluation rule: mean loss (NLL), accuracy, predictive
    entropy and expected calibration error."""
    run.model.eval()
    R, device = len(run.model), run.data.device
    loss, correct, entropy = (torch.zeros(R, device=device, dtype=torch.float64) for _ in range(3))
    bins = torch.zeros(3, R, ECE_BINS, device=device, dtype=torch.float64)  # count, confidence, correct
    for x, y in run.data.chunks(split, batch_size):
        logp = run.regs.predict(run.model, x)  # [R, B, C]
        probs = logp.exp()
        confidence, predicted = probs.max(-1)
        hit = (predicted == y).double()
        loss -= logp.gather(-1, y.expand(R, -1).unsqueeze(-1)).squeeze(-1).sum(1)
        correct += hit.sum(1)
        entropy += torch.special.entr(probs).sum(-1).sum(1)
        index = (confidence * ECE_BINS).nan_to_num(0.0).long().clamp_(0, ECE_BINS - 1)  # NaN: a diverged replica
        for row, values in enumerate((torch.ones_like(hit), confidence.double(), hit)):
            bins[row].scatter_add_(1, index, values)
    n = run.data.size(split)
    count, confidence, hits = bins
    ece = (confidence - hits).abs().sum(1) / n  # sum over bins of (n_b / n) |mean conf_b - acc_b|
    return {"loss": (loss / n).tolist(), "accuracy": (correct / n).tolist(), "entropy": (entropy / n).tolist(),
            "ece": ece.tolist()}


def diverged(mean_loss: torch.Tensor, num_classes: int) -> list[bool]:
    """Which replicas have diverged (see DIVERGED_LOSS_FACTOR), from the epoch's mean training loss [R]."""
    limit = DIVERGED_LOSS_FACTOR * math.log(max(num_classes, 2))
    return [not (math.isfinite(v) and v <= limit) for v in mean_loss.tolist()]


def fit(cfg, run: Run, start_epoch: int, on_epoch) -> None:
    """Train epochs start_epoch..cfg.epochs. After each, `on_epoch(epoch, mean_loss, metrics,
    train_seconds, eval_seconds)` gets the mean training loss per replica [R] and every split's
    metrics ({split: evaluate(...)}; empty on the epochs that `eval_every` skips), and returns
    False to stop early (no replica left running)."""
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        mean_loss = train_epoch(run, cfg.batch_size) / math.ceil(run.data.size("train") / cfg.batch_size)
        if run.scheduler is not None:
            run.scheduler.step()
        synchronize(run.data.device)
        train_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
        metrics = {split: evaluate(run, split, cfg.eval_batch_size)
                   for split in SPLITS if evaluated and run.data.size(split)}
        eval_seconds = time.perf_counter() - t0
        if not on_epoch(epoch, mean_loss, metrics, train_seconds, eval_seconds):
            return


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
