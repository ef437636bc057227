"""Sensor-mode fitting: give a checkpoint a fresh I/O adapter and fit it on recorded frames.

A sensor-mode model reads one frame of named features per control cycle and answers named
outputs (``runtime.model.transformer.IOAdapter``). :func:`fit` loads a float checkpoint or an unquantized
package, attaches a fresh adapter whose normalisation comes from the data, fits the adapter
alone (``train="adapter"``: the backbone is frozen) or the whole model (``train="all"``) on
``frames`` [N, T, F] and ``targets`` [N, T, O], and writes an unquantized r1edge package
carrying the ``io`` signature. ``r1edge compress`` then prunes and quantizes it.

Training runs :meth:`Transformer.forward_sensor` with the engine's sliding window, so what
is fitted is what the stream engine computes (up to int8 rounding). It samples crops of
``seq_len`` frames from the training rows; a frame counts in the loss only if it sees a full
window of history within its crop, or if the crop starts at the row's first frame (so the
start of a run, with less history, is learned too). The loss is the MSE of the outputs in
normalised units (each output divided by its standard deviation), with Adam, a cosine
learning-rate decay and gradient clipping. With ``train="all"`` the routers are kept
balanced the DeepSeek-V3 way, without an auxiliary loss: after every step each expert's
``e_score_correction_bias`` moves by ``balance_rate`` towards equal load.

The last ``held_out`` fraction of the rows is never trained on; the report gives their MSE
(whole rows, run from their first frame as a controller would) beside the baseline of
predicting the training mean. Everything is seeded: the same data, arguments and thread
count give the same package bit for bit.

From nothing: :func:`fit` with ``init`` (a preset, see :data:`PRESETS`, or a ``config.json``)
starts from a seeded random DeepSeek-V3 model of that shape and trains it whole.

Data files (``.npz``, read without pickle; see :data:`DATA_FORMAT`): ``frames`` float
[N, T, F], ``targets`` float [N, T, O], and optionally ``feature_names`` / ``output_names``
(string arrays) naming the columns. Errors name the file and key.

Long fits: with ``keep_best`` the held-out error is measured every ``eval_every`` steps and
the best state is what the package gets; with ``checkpoint`` (a directory) the whole training
state (weights, optimizer, random generator, best state) is saved there at every evaluation.
SIGINT (Ctrl-C) stops a fit at the end of the current step: it saves the checkpoint and
returns with ``stopped_at`` set, the model holding its best state so far; ``resume=True``
continues from the checkpoint and ends bitwise where an uninterrupted fit would have.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.model.transformer import IOAdapter, MoE, Transformer

log = logging.getLogger(__name__)

TRAIN_MODES = ("adapter", "all")


#: A small sensor-mode policy: DeepSeek-V3 layout (MLA attention, one dense layer, then noaux_tc
#: MoE layers of 8 routed experts, top-2 in 2 groups keep 1, and a shared expert); ~150k parameters.
SMALL_POLICY_CONFIG = dict(vocab_size=16, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                           num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                           kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                           max_position_embeddings=4096, routed_scaling_factor=2.5, norm_topk_prob=True,
                           rope_theta=10000.0)


_PRESET_COMMON = dict(vocab_size=16, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096,
                      routed_scaling_factor=2.5, norm_topk_prob=True, rope_theta=10000.0)

#: ``r1edge fit --init`` presets: DeepSeek-V3 layout (MLA attention, one dense layer, then noaux_tc
#: MoE layers with one shared expert), a random init to train whole. ``params`` and ``active``
#: count every parameter (with a 6-input, 2-output adapter) and those used per frame; ``window``
#: is the default history; ``step_ms`` is one training step (batch 16, crops of 3 windows, one
#: thread) measured on the 2-core development VM at load average ~7 (about 2-3x an idle VM).
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "config": SMALL_POLICY_CONFIG, "window": 32, "params": 228_498, "active": 117_906, "step_ms": 164,
        "suits": "a few to ~10 signals and one operating regime, dynamics that play out within ~30 cycles "
                 "(a level or temperature loop, a drive, a balancing task)"},
    "medium": {
        "config": {**_PRESET_COMMON, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                   "num_hidden_layers": 4, "num_attention_heads": 8, "n_routed_experts": 16,
                   "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "kv_lora_rank": 32, "q_lora_rank": 64,
                   "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16},
        "window": 64, "params": 1_585_794, "active": 553_602, "step_ms": 1240,
        "suits": "tens of signals, several operating regimes, or a memory of 64 cycles"},
    "large": {
        "config": {**_PRESET_COMMON, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 96,
                   "num_hidden_layers": 5, "num_attention_heads": 8, "n_routed_experts": 16,
                   "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "kv_lora_rank": 64, "q_lora_rank": 128,
                   "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32},
        "window": 128, "params": 6_440_898, "active": 2_312_130, "step_ms": 9804,
        "suits": "many signals and regimes and histories of 128 cycles, where data are plentiful; slow to "
                 "train on a CPU"},
}

#: The fitting data format, as ``r1edge fit --help`` and the docs' fit page give it.
DATA_FORMAT = """An .npz file (numpy.savez; no pickled objects) with
  frames        float [N, T, F]  N recorded runs (rows) of T consecutive control cycles, F inputs
                                 per cycle, in engineering units, sampled at the deployment's period
  targets       float [N, T, O]  what the expert did (or the right answer) at each of those cycles
  feature_names str [F]          input names, as the deployment's [[inputs]] call them (or --inputs)
  output_names  str [O]          output names, as its [[outputs]] call them (or --outputs)
Each row is run from its first frame, as a controller starts with an empty history, so rows
should be whole runs from start-up, and at least 3 windows long (T >= 3 x window): training
crops are 3 windows, and a frame counts only once it sees a full window of history (or when its
crop starts at frame 0). Use at least 5 rows: the last 20% (--held-out) are never trained on
and measure the fit."""


class DataError(ValueError):
    """Fitting data is malformed; the message names the file (if any) and the key."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def check_data(frames: Any, targets: Any, *, n_inputs: int | None = None, n_outputs: int | None = None,
               where: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Validate ``frames`` [N, T, F] and ``targets`` [N, T, O]; returns them as float32.

    Raises DataError naming the key ('frames' or 'targets') and, for a non-finite value,
    its index.
    """
    out = []
    for key, arr, width in (("frames", frames, n_inputs), ("targets", targets, n_outputs)):
        arr = np.asarray(arr)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) \
                or arr.dtype == np.bool_:
            raise DataError(f"{where}: key {key!r} must be a float array, got dtype {arr.dtype}")
        if arr.ndim != 3 or 0 in arr.shape:
            raise DataError(f"{where}: key {key!r} must be a non-empty [N, T, {'F' if key == 'frames' else 'O'}] "
                            f"array, got shape {arr.shape}")
        if width is not None and arr.shape[2] != width:
            raise DataError(f"{where}: key {key!r} has {arr.shape[2]} columns, expected {width} "
                            f"(one per {'input' if key == 'frames' else 'output'} name)")
        bad = np.argwhere(~np.isfinite(arr))
        if len(bad):
            raise DataError(f"{where}: key {key!r} has a non-finite value at {list(map(int, bad[0]))}")
        out.append(arr.astype(np.float32, copy=False))
    frames, targets = out
    if frames.shape[:2] != targets.shape[:2]:
        raise DataError(f"{where}: key 'targets' has shape {targets.shape}, which does not match 'frames' "
                        f"{frames.shape} in rows and time steps [N, T]")
    return frames, targets


def load_data(path: str | Path) -> dict[str, Any]:
    """Read a fitting ``.npz`` (see the module docstring); returns ``frames``, ``targets`` and
    ``inputs`` / ``outputs`` (lists of names, or None when the file does not name them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if not hasattr(npz, "files"):
        raise DataError(f"{path}: expected an .npz archive with keys 'frames' and 'targets'")
    with npz:
        for key in ("frames", "targets"):
            if key not in npz.files:
                raise DataError(f"{path}: missing key {key!r} (found {npz.files})")
        try:
            frames, targets = npz["frames"], npz["targets"]
            names = {}
            for key, label in (("feature_names", "inputs"), ("output_names", "outputs")):
                if key in npz.files:
                    arr = npz[key]
                    if arr.ndim != 1 or arr.dtype.kind not in "US":
                        raise DataError(f"{path}: key {key!r} must be a 1-D string array")
                    names[label] = [str(s) for s in arr]
                else:
                    names[label] = None
        except ValueError as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path}: cannot read ({exc}); pickled arrays are refused") from None
    frames, targets = check_data(frames, targets, where=str(path))
    for label, key, arr in (("inputs", "feature_names", frames), ("outputs", "output_names", targets)):
        if names[label] is not None and len(names[label]) != arr.shape[2]:
            raise DataError(f"{path}: key {key!r} has {len(names[label])} names for {arr.shape[2]} columns")
    return {"frames": frames, "targets": targets, **names}


# --------------------------------------------------------------------------------------------
# Model set-up
# --------------------------------------------------------------------------------------------

def new_model(init: str | Path, *, seed: int = 0) -> tuple[Transformer, int | None]:
    """A seeded random model to train from nothing: ``init`` is a preset name (``small``,
    ``medium``, ``large``; see :data:`PRESETS`) or a DeepSeek-V3 ``config.json`` file.
    Returns (model, the preset's window or None)."""
    from runtime.model.config import ModelConfig

    if str(init) in PRESETS:
        preset = PRESETS[str(init)]
        config, window = ModelConfig(**preset["config"]), preset["window"]
    elif Path(init).suffix == ".json" or Path(init).is_file():
        config, window = ModelConfig.from_json(init), None
    else:
        raise ValueError(f"--init {init!r}: not a preset ({', '.join(PRESETS)}) or a config.json file")
    return init_weights(Transformer(config), seed=seed), window


def init_weights(model: Transformer, *, seed: int = 0, std: float = 0.02) -> Transformer:
    """Random initialisation for training from scratch (in place, seeded), as transformers
    initialises DeepSeek-V3: matrices ~ N(0, std), norms 1, biases and routing bias 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
    return model


def _stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std over [N, T] (float64), with constant columns given std 1."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-6 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def attach_adapter(model: Transformer, inputs: Sequence[str], outputs: Sequence[str], *,
                   frames: np.ndarray | None = None, targets: np.ndarray | None = None,
                   seed: int = 0) -> IOAdapter:
    """Give ``model`` a fresh, seeded I/O adapter (replacing any it had); returns it.

    Normalisation stats come from ``frames`` [N, T, F] / ``targets`` [N, T, O] when given
    (mean and std per column), else they stay 0 / 1. The projections are initialised from
    ``seed``; the adapter takes the model's dtype and device.
    """
    ref = model.model.norm.weight
    gen = torch.Generator().manual_seed(seed)
    adapter = IOAdapter(list(inputs), list(outputs), model.config.hidden_size)
    with torch.no_grad():
        for lin in (adapter.in_proj, adapter.out_proj):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * 2 * bound - bound)
            lin.bias.zero_()
        if frames is not None:
            if np.shape(frames)[-1] != len(adapter.input_names):
                raise DataError(f"frames have {np.shape(frames)[-1]} columns for {len(adapter.input_names)} inputs")
            adapter.in_mean[:], adapter.in_std[:] = _stats(np.asarray(frames))
        if targets is not None:
            if np.shape(targets)[-1] != len(adapter.output_names):
                raise DataError(f"targets have {np.shape(targets)[-1]} columns for "
                                f"{len(adapter.output_names)} outputs")
            adapter.out_mean[:], adapter.out_std[:] = _stats(np.asarray(targets))
    if model.adapter is not None:
        log.info("replacing the model's I/O adapter %s with a fresh one", model.adapter.signature())
    model.adapter = adapter.to(device=ref.device, dtype=ref.dtype)
    return model.adapter


def training_step(loss: torch.Tensor, opt, sched, balancer: "BiasBalancer", params, grad_clip: float) -> float:
    """One optimiser step from ``loss``: its gradients (their norm clipped to ``grad_clip`` when
    set), the optimiser, its schedule and the router biases' balancing, in that order; the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    balancer.step()
    return float(loss.detach())


class BiasBalancer:
    """DeepSeek-V3 auxiliary-loss-free load balancing of a model's ``noaux_tc`` routers.

    While installed it counts, per MoE layer, the tokens routed to each expert (as the layer's
    observer); :meth:`step` then moves each expert's ``e_score_correction_bias`` by ``rate``
    towards equal load (up for under-loaded experts, down for over-loaded ones) and clears the
    counts. Routers without a correction bias (the DeepSeek-V2 family) are left to their loss.
    """

    def __init__(self, model: Transformer, rate: float):
        self.rate = rate
        self.moes = [m for m in model.modules() if isinstance(m, MoE) and m.gate.e_score_correction_bias is not None
                     ] if rate > 0 else []
        self.counts = [torch.zeros(m.gate.weight.shape[0]) for m in self.moes]
        for m, c in zip(self.moes, self.counts):
            m.observer = lambda record, c=c: c.add_(torch.bincount(
                record.expert_ids.detach().reshape(-1).cpu(), minlength=c.numel()).float())

    @torch.no_grad()
    def step(self) -> None:
        """Move the biases by the load counted since the last step, then clear the counts."""
        for m, c in zip(self.moes, self.counts):
            m.gate.e_score_correction_bias += self.rate * torch.sign(c.mean() - c)
            c.zero_()

    def reset(self) -> None:
        """Forget the counts (routing seen while evaluating is not training load)."""
        for c in self.counts:
            c.zero_()

    def close(self) -> None:
        """Remove the observers."""
        for m in self.moes:
            m.observer = None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def split_rows(n: int, held_out: float) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): the last ``ceil(held_out * n)`` rows are held out."""
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must be in [0, 1), got {held_out}")
    k = math.ceil(held_out * n) if held_out > 0 else 0
    if k and n - k < 1:
        raise DataError(f"key 'frames' has {n} row(s): at least 2 are needed to hold one out "
                        "(or pass held_out=0)")
    return np.arange(n - k), np.arange(n - k, n)


@torch.no_grad()
def evaluate(model: Transformer, frames: np.ndarray, targets: np.ndarray, *, window: int | None,
             baseline: torch.Tensor | None = None) -> dict[str, Any]:
    """MSE of the model's outputs over whole rows, each run from its first frame.

    ``mse`` is in normalised units (each output's error divided by the adapter's ``out_std``,
    averaged over outputs); ``per_output_mse`` in engineering units. With ``baseline`` (a
    constant prediction [O], e.g. the training mean) its normalised MSE is reported too.
    """
    adapter = model.adapter
    std = adapter.out_std.detach().double().cpu()
    sq = torch.zeros(len(adapter.output_names), dtype=torch.float64)
    sq_base = torch.zeros_like(sq)
    n = 0
    was_training = model.training
    model.eval()
    dtype = adapter.out_std.dtype
    for i in range(frames.shape[0]):
        x = torch.from_numpy(frames[i:i + 1]).to(adapter.in_mean.device, dtype)
        y = torch.from_numpy(targets[i]).double()
        pred = model.forward_sensor(x, window=window)[0].double().cpu()
        sq += (pred - y).pow(2).sum(0)
        if baseline is not None:
            sq_base += (baseline.double() - y).pow(2).sum(0)
        n += y.shape[0]
    model.train(was_training)
    mse = sq / n
    report = {"rows": int(frames.shape[0]), "frames": n,
              "mse": float((mse / std.pow(2)).mean()),
              "per_output_mse": {name: float(v) for name, v in zip(adapter.output_names, mse)}}
    if baseline is not None:
        report["baseline_mse"] = float((sq_base / n / std.pow(2)).mean())
    return report


def fit_model(model: Transformer, frames: np.ndarray, targets: np.ndarray, *, train: str = "adapter",
              window: int | None = 32, steps: int = 500, lr: float = 2e-3, batch: int = 16,
              seq_len: int | None = None, seed: int = 0, held_out: float = 0.2, start_fraction: float = 0.125,
              balance_rate: float = 1e-3, grad_clip: float = 1.0, progress: bool = True,
              callback: Callable[[int, Transformer], bool] | None = None, eval_every: int = 0,
              keep_best: bool = False, checkpoint: str | Path | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Fit ``model`` (which has an adapter) in place on ``frames`` / ``targets``; returns a report.

    ``train``: ``"adapter"`` (only the adapter's projections learn) or ``"all"``.
    ``window``: the attention window (the engine's ``window``; None: full causal attention).
    ``seq_len``: frames per training crop (default 3 x window, at most T).
    ``start_fraction``: share of crops that start at a row's first frame. ``callback(step,
    model)`` runs every ``eval_every`` steps and may return True to stop early.
    ``keep_best``: measure the held-out error every ``eval_every`` steps (default: a tenth of
    the steps) and at the end, and leave the model in its best state. ``checkpoint``: a
    directory for the training state, saved at each evaluation and on SIGINT; ``resume``
    continues from it. See the module docstring for the loss, the held-out report and stops.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    if model.adapter is None:
        raise ValueError("the model has no I/O adapter; call attach_adapter first")
    adapter = model.adapter
    frames, targets = check_data(frames, targets, n_inputs=len(adapter.input_names),
                                 n_outputs=len(adapter.output_names))
    for name, value in (("steps", steps), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if window is not None and window < 1:
        raise ValueError(f"window must be positive, got {window}")
    N, T, _ = frames.shape
    train_rows, held_rows = split_rows(N, held_out)
    ctx = window if window is not None else T
    L = min(T, seq_len or 3 * ctx)
    first_full = min(ctx - 1, L - 1)
    if (keep_best or checkpoint is not None) and not eval_every:
        eval_every = max(1, steps // 10)
    keep_best = keep_best and len(held_rows) > 0

    for p in model.parameters():
        p.requires_grad_(train == "all")
    for p in adapter.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))

    rng = np.random.default_rng([seed, 0x5EED])
    identity = {"train": train, "window": window, "steps": steps, "lr": lr, "batch": batch, "seq_len": L,
                "seed": seed, "held_out": held_out, "start_fraction": start_fraction, "balance_rate": balance_rate,
                "grad_clip": grad_clip, "eval_every": eval_every, "keep_best": keep_best,
                "config": model.config.to_dict(), "io": adapter.signature(),
                "data_sha256": hashlib.sha256(frames.tobytes() + targets.tobytes()).hexdigest()}
    losses: list[float] = []
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"step": None, "held_out_mse": math.inf, "state": None}
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        if not resume:
            raise ValueError(f"{ckpt}: a checkpoint of an unfinished fit is there; resume it (--resume) or "
                             "delete it to start over")
        start = _load_checkpoint(ckpt, identity, model, opt, rng, best, losses, history)
        with warnings.catch_warnings():             # replay the schedule up to the checkpoint
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                sched.step()
        log.info("resuming the fit from %s at step %d of %d", ckpt, start, steps)
    elif resume:
        raise ValueError(f"{ckpt}: no checkpoint to resume from")
    balancer = BiasBalancer(model, balance_rate if train == "all" else 0.0)

    held_x, held_y = frames[held_rows], targets[held_rows]
    device, dtype = adapter.in_mean.device, adapter.in_mean.dtype
    x_t = torch.from_numpy(frames).to(device, dtype)
    y_t = torch.from_numpy(targets).to(device, dtype)
    positions = torch.arange(L, device=device)
    model.train()
    t0 = time.perf_counter()
    from tqdm import tqdm
    bar = tqdm(range(start, steps), desc=f"fit ({train})", unit="step", disable=not progress,
               initial=start, total=steps)
    stopped_at = steps
    interrupted: dict[str, Any] = {"at": None}
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(*_):
            log.warning("stopping the fit at the end of this step (the checkpoint keeps it)")
            interrupted["at"] = True
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        for step in bar:
            rows = torch.from_numpy(rng.choice(train_rows, size=batch))
            starts = rng.integers(0, T - L + 1, size=batch)
            starts[rng.random(batch) < start_fraction] = 0
            idx = torch.from_numpy(starts)[:, None] + positions[None]
            x = x_t[rows[:, None], idx]
            y = y_t[rows[:, None], idx]
            mask = (positions[None] >= first_full) | (torch.from_numpy(starts)[:, None] == 0)
            pred = model.forward_sensor(x, window=window)
            err = ((pred - y) / adapter.out_std).pow(2).mean(-1)
            loss = (err * mask).sum() / mask.sum()
            losses.append(training_step(loss, opt, sched, balancer, params, grad_clip))
            done = step + 1
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            if done % max(1, steps // 10) == 0 or done == steps:
                log.info("fit step %d/%d: loss %.5g (normalised MSE)", done, steps,
                         float(np.mean(losses[-max(1, steps // 10):])))
            at_eval = eval_every and done % eval_every == 0 and done < steps
            if at_eval and keep_best:
                _evaluate_best(model, held_x, held_y, window, done, best, history, losses)
                model.train()
                balancer.reset()
                if progress:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", held_out=f"{history[-1]['held_out_mse']:.4g}",
                                    refresh=False)
            if callback is not None and at_eval and callback(done, model):
                stopped_at = done
                log.info("fit stopped early at step %d", stopped_at)
                break
            if ckpt is not None and (at_eval or interrupted["at"]):
                _save_checkpoint(ckpt, done, identity, model, opt, rng, best, losses, history)
            if interrupted["at"]:
                interrupted["at"] = stopped_at = done
                break
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        balancer.close()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    if keep_best:
        if not interrupted["at"] and (not history or history[-1]["step"] != stopped_at):
            _evaluate_best(model, held_x, held_y, window, stopped_at, best, history, losses)
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        model.eval()
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    report: dict[str, Any] = {
        "train": train, "window": window, "steps": stopped_at, "batch": batch, "seq_len": L, "lr": lr,
        "seed": seed, "balance_rate": balance_rate if balancer.moes else 0.0,
        "rows": {"train": len(train_rows), "held_out": len(held_rows)},
        "loss": {"first": losses[0], "last": float(np.mean(tail))},
        "seconds": round(seconds, 2), "threads": torch.get_num_threads(),
    }
    if keep_best:
        report["best"] = {"step": best["step"], "held_out_mse": best["held_out_mse"]}
        report["history"] = history
    if interrupted["at"]:
        report["stopped_at"] = stopped_at
        report["checkpoint"] = None if ckpt is None else str(ckpt)
    elif ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)             # finished: nothing left to resume
    if len(held_rows):
        mean = torch.from_numpy(targets[train_rows].reshape(-1, targets.shape[2]).astype(np.float64).mean(0))
        report["held_out"] = evaluate(model, held_x, held_y, window=window, baseline=mean)
        h = report["held_out"]
        log.info("held-out MSE %.5g (normalised) vs %.5g predicting the training mean, over %d rows",
                 h["mse"], h["baseline_mse"], h["rows"])
    return report


def _evaluate_best(model: Transformer, frames: np.ndarray, targets: np.ndarray, window: int | None, step: int,
                   best: dict, history: list, losses: list) -> None:
    """Held-out MSE now; keep a copy of the weights if it is the best so far."""
    mse = evaluate(model, frames, targets, window=window)["mse"]
    history.append({"step": step, "loss": float(np.mean(losses[-10:])), "held_out_mse": mse})
    log.info("step %d: held-out MSE %.5g (best %.5g)", step, mse, min(mse, best["held_out_mse"]))
    if mse < best["held_out_mse"]:
        best.update(step=step, held_out_mse=mse,
                    state={k: v.detach().clone() for k, v in model.state_dict().items()})


def _save_checkpoint(path: Path, step: int, identity: dict, model: Transformer, opt, rng, best: dict,
                     losses: list, history: list) -> None:
    """The whole training state, without pickle: tensors in safetensors, the rest in JSON.
    The JSON is written last and names the step the tensors were saved at."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    state = opt.state_dict()
    for i, st in state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().reshape(v.shape).contiguous()
    if best["state"] is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best["state"].items()})
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path / "state.safetensors")
    meta = {"step": step, "identity": identity, "rng": rng.bit_generator.state,
            "param_groups": state["param_groups"], "opt_keys": {str(i): sorted(st) for i, st in state["state"].items()},
            "best": {"step": best["step"], "held_out_mse": best["held_out_mse"] if best["step"] else None},
            "losses": losses, "history": history}
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path / "state.json")
    log.info("checkpoint at step %d written to %s", step, path)


def _load_checkpoint(path: Path, identity: dict, model: Transformer, opt, rng, best: dict, losses: list,
                     history: list) -> int:
    """Restore what :func:`_save_checkpoint` wrote; returns its step. Refuses a checkpoint of a
    different fit (arguments, data, model) naming what differs."""
    from safetensors import safe_open

    meta = json.loads((path / "state.json").read_text())
    differ = [k for k in identity if meta["identity"].get(k) != identity[k]]
    if differ:
        raise ValueError(f"{path}: the checkpoint is of a different fit ({', '.join(differ)} differ: was "
                         + ", ".join(f"{k}={meta['identity'].get(k)!r}" for k in differ if k not in ("config", "io"))
                         + "); delete it to start over")
    with safe_open(str(path / "state.safetensors"), "pt") as f:
        if f.metadata().get("step") != str(meta["step"]):
            raise ValueError(f"{path}: state.safetensors and state.json are of different steps; delete the "
                             "checkpoint to start over")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict({"state": {int(i): {k: tensors[f"opt.{i}.{k}"] for k in keys}
                                   for i, keys in meta["opt_keys"].items()},
                         "param_groups": meta["param_groups"]})
    rng.bit_generator.state = meta["rng"]
    if meta["best"]["step"] is not None:
        best.update(step=meta["best"]["step"], held_out_mse=meta["best"]["held_out_mse"],
                    state={k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
    losses[:] = meta["losses"]
    history[:] = meta["history"]
    return int(meta["step"])


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------

def save_package(model: Transformer, out: str | Path, *, report: dict[str, Any] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` (float, with its adapter) as an unquantized r1edge package; returns the manifest."""
    from sdk.tools.package import FORMAT, FORMAT_VERSION, r1edge_version, write_package

    if model.adapter is None:
        raise ValueError("the model has no I/O adapter; a fitted package is a sensor-mode package")
    cfg = model.config
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"r1edge {r1edge_version()}",
        "config": cfg.to_dict(),
        "quantization": {"scheme": "none"},
        "experts": {"kept": {}, "original_n_routed_experts": cfg.n_routed_experts},
        "io": model.adapter.signature(),
        "fit": report,
    }
    state = {k: v.detach().float() if v.is_floating_point() else v.detach()
             for k, v in model.state_dict().items()}
    return write_package(out, manifest, state, overwrite=overwrite)


def fit(source: str | Path | None, frames: np.ndarray, targets: np.ndarray, *, inputs: Sequence[str],
        outputs: Sequence[str], out: str | Path, init: str | Path | None = None, train: str | None = None,
        window: int | None = None, steps: int = 500, lr: float = 2e-3, seed: int = 0, batch: int = 16,
        seq_len: int | None = None, held_out: float = 0.2, balance_rate: float = 1e-3, threads: int | None = None,
        eval_every: int = 0, checkpoint: str | Path | None = None, resume: bool = False, progress: bool = True,
        overwrite: bool = False) -> dict[str, Any]:
    """Fit a sensor-mode policy and write it as an unquantized package ``out``.

    Start from ``source`` (an HF DeepSeek-V3 checkpoint directory or an unquantized r1edge
    package; a fresh adapter is attached) or, with ``init``, from nothing (a preset of
    :data:`PRESETS` or a ``config.json``: a seeded random model). ``train`` defaults to
    ``"adapter"`` from a source and ``"all"`` from ``init``; ``window`` to the preset's, else
    32. ``frames`` [N, T, F] and ``targets`` [N, T, O] are named column by column by ``inputs``
    and ``outputs``. ``threads``: torch threads while fitting (None: leave torch's setting).
    The held-out error is measured every ``eval_every`` steps (default a tenth) and the
    package gets the best state; ``checkpoint`` (default ``<out>.ckpt``) keeps the training
    state for ``resume``. Returns the fit report (also stored in the package manifest under
    ``fit``), with ``package`` set to ``out``; a fit stopped by SIGINT has ``stopped_at``.
    """
    from sdk.tools.loading import load_model
    from sdk.tools.package import check_out_dir, is_package, read_manifest

    if (source is None) == (init is None):
        raise ValueError("give a source checkpoint or package, or --init (a preset or a config.json), not both")
    ckpt = Path(checkpoint) if checkpoint is not None else Path(str(out) + ".ckpt")
    if not resume and not (ckpt / "state.json").is_file():   # a stopped fit's checkpoint: fit_model says
        check_out_dir(out, overwrite)                         # to resume it
    frames, targets = check_data(frames, targets, n_inputs=len(inputs), n_outputs=len(outputs))
    train_rows, _ = split_rows(frames.shape[0], held_out)
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    try:
        if init is not None:
            model, preset_window = new_model(init, seed=seed)
            origin = {"init": str(init)}
        else:
            source = Path(source)
            if is_package(source):
                scheme = read_manifest(source)["quantization"]["scheme"]
                if scheme != "none":
                    raise ValueError(f"{source}: package is quantized ({scheme}); fit needs a float checkpoint, "
                                     "an unquantized package, or --init to start from nothing")
            model, preset_window = load_model(source), None
            origin = {"source": str(source)}
        window = window or preset_window or 32
        train = train or ("all" if init is not None else "adapter")
        attach_adapter(model, inputs, outputs, frames=frames[train_rows], targets=targets[train_rows], seed=seed)
        checkpoint = ckpt
        report = fit_model(model, frames, targets, train=train, window=window, steps=steps, lr=lr, batch=batch,
                           seq_len=seq_len, seed=seed, held_out=held_out, balance_rate=balance_rate,
                           progress=progress, eval_every=eval_every, keep_best=True, checkpoint=checkpoint,
                           resume=resume)
    finally:
        torch.set_num_threads(old_threads)
    report.update(origin)
    save_package(model, out, report=report, overwrite=overwrite or bool(report.get("stopped_at")) or resume)
    return {**report, "package": str(out)}


def write_calibration(path: str | Path, frames: np.ndarray, window: int) -> int:
    """Cut ``frames`` [N, T, F] into rows of ``window`` frames (``.npz`` key ``frames``) for
    ``r1edge compress --calib``: compress attends over a whole row, so window-long rows see
    exactly the history the deployed engine does. Returns the number of rows."""
    n, t, f = frames.shape
    if t < window:
        raise DataError(f"rows of {t} frames are shorter than the window ({window})")
    k = t // window
    rows = frames[:, :k * window].reshape(n * k, window, f)
    np.savez(path, frames=rows.astype(np.float32))
    return len(rows)


def train_policy_package(config: dict[str, Any], frames: np.ndarray, targets: np.ndarray, *,
                         inputs: Sequence[str], outputs: Sequence[str], out: str | Path,
                         calib_frames: np.ndarray, window: int, steps: int, batch: int = 16,
                         lr: float = 2e-3, seed: int = 0, held_out: float = 0.2,
                         progress: bool = True) -> dict[str, Any]:
    """A sensor-mode policy from scratch: a seeded random DeepSeek-V3 model of ``config``
    with a fresh adapter, trained whole on ``frames``/``targets``, then compressed to a W8A8
    int8 package at ``out`` (all experts kept) calibrated on ``calib_frames`` [N, T, F].

    Runs torch single-threaded (tiny matrices: faster, and the result does not depend on the
    core count). Returns ``{"fit", "quality", "package", "package_bytes"}``.
    """
    import tempfile

    from runtime.model.config import ModelConfig
    from sdk.tools.compress import compress

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = init_weights(Transformer(ModelConfig(**config)), seed=seed)
        rows, _ = split_rows(len(frames), held_out)
        attach_adapter(model, inputs, outputs, frames=frames[rows], targets=targets[rows], seed=seed)
        report = fit_model(model, frames, targets, train="all", window=window, steps=steps, batch=batch, lr=lr,
                           seed=seed, held_out=held_out, progress=progress)
        with tempfile.TemporaryDirectory() as tmp:
            float_pkg = Path(tmp) / "float"
            save_package(model, float_pkg, report=report)
            calib = Path(tmp) / "calib.npz"
            np.savez(calib, frames=calib_frames)
            manifest = compress(float_pkg, out, calib=calib, quant="int8", progress=progress, overwrite=True)
    finally:
        torch.set_num_threads(threads)
    return {"fit": report, "quality": manifest["quality"], "package": str(out),
            "package_bytes": manifest["size"]["package_bytes"]}


def render_policy_report(report: dict[str, Any]) -> None:
    """One-paragraph summary of :func:`train_policy_package`'s report."""
    fit_report, held = report["fit"], report["fit"].get("held_out", {})
    print(f"fit: {fit_report['steps']} steps in {fit_report['seconds']} s, loss "
          f"{fit_report['loss']['first']:.4f} -> {fit_report['loss']['last']:.4f}; held-out MSE "
          f"{held.get('mse', float('nan')):.4f} (predicting the mean: {held.get('baseline_mse', float('nan')):.4f})")
    print(f"int8 package {report['package']} ({report['package_bytes']} bytes); quality {report['quality']}")


def render_fit(report: dict[str, Any]) -> None:
    """Human-readable form of a fit report."""
    print(f"fitted {report['train']} on {report['rows']['train']} rows for {report['steps']} steps "
          f"(window {report['window']}, crops of {report['seq_len']}, batch {report['batch']}) "
          f"in {report['seconds']:.1f} s")
    print(f"  training loss     {report['loss']['first']:.5g} -> {report['loss']['last']:.5g} (normalised MSE)")
    h = report.get("held_out")
    if h:
        print(f"  held-out MSE      {h['mse']:.5g} normalised over {h['rows']} rows "
              f"(predicting the mean: {h['baseline_mse']:.5g})")
        for name, v in h["per_output_mse"].items():
            print(f"    {name:16s}{v:.5g}")
    if report.get("best") and report["best"]["step"] is not None:
        print(f"  best held-out     step {report['best']['step']}: MSE {report['best']['held_out_mse']:.5g} "
              "(the package holds this state)")
    if report.get("stopped_at"):
        print(f"  STOPPED at step {report['stopped_at']}: the training state is in {report['checkpoint']}; "
              "run the same command with --resume to finish")
    if report.get("calibration"):
        c = report["calibration"]
        print(f"  calibration       {c['file']} ({c['rows']} rows of {c['window']} frames, for r1edge compress --calib)")
    if report.get("package"):
        print(f"  package           {report['package']}")
