"""Sensor-mode fitting: give a checkpoint a fresh I/O adapter and fit it on recorded frames.

A sensor-mode model reads one frame of named features per control cycle and answers named
outputs (``runtime.model.IOAdapter``). :func:`fit` loads a float checkpoint or an unquantized
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

Data files (``.npz``, read without pickle): ``frames`` float [N, T, F], ``targets`` float
[N, T, O], and optionally ``feature_names`` / ``output_names`` (string arrays) naming the
columns. Errors name the file and key.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.model import IOAdapter, MoE, Transformer

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


class _LoadCounter:
    """MoE observer counting the tokens routed to each expert (for bias balancing)."""

    def __init__(self, n_experts: int):
        self.counts = torch.zeros(n_experts)

    def __call__(self, record) -> None:
        self.counts += torch.bincount(record.expert_ids.detach().reshape(-1).cpu(),
                                      minlength=self.counts.numel()).float()


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
          callback: Callable[[int, Transformer], bool] | None = None, eval_every: int = 0) -> dict[str, Any]:
    """Fit ``model`` (which has an adapter) in place on ``frames`` / ``targets``; returns a report.

    ``train``: ``"adapter"`` (only the adapter's projections learn) or ``"all"``.
    ``window``: the attention window (the engine's ``window``; None: full causal attention).
    ``seq_len``: frames per training crop (default 3 x window, at most T).
    ``start_fraction``: share of crops that start at a row's first frame. ``callback(step,
    model)`` runs every ``eval_every`` steps and may return True to stop early. See the
    module docstring for the loss and the held-out report.
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

    for p in model.parameters():
        p.requires_grad_(train == "all")
    for p in adapter.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    moes = [m for m in model.modules() if isinstance(m, MoE)] if train == "all" and balance_rate > 0 else []
    counters = [_LoadCounter(m.gate.weight.shape[0]) for m in moes]
    for m, c in zip(moes, counters):
        m.observer = c

    rng = np.random.default_rng([seed, 0x5EED])
    device, dtype = adapter.in_mean.device, adapter.in_mean.dtype
    x_t = torch.from_numpy(frames).to(device, dtype)
    y_t = torch.from_numpy(targets).to(device, dtype)
    positions = torch.arange(L, device=device)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    from tqdm import tqdm
    bar = tqdm(range(steps), desc=f"fit ({train})", unit="step", disable=not progress)
    stopped_at = steps
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            if moes:
                with torch.no_grad():
                    for m, c in zip(moes, counters):
                        # aux-loss-free balancing: raise the bias of under-loaded experts
                        m.gate.e_score_correction_bias += balance_rate * torch.sign(c.counts.mean() - c.counts)
                        c.counts.zero_()
            losses.append(float(loss.detach()))
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
                log.info("fit step %d/%d: loss %.5g (normalised MSE)", step + 1, steps,
                         float(np.mean(losses[-max(1, steps // 10):])))
            if callback is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                if callback(step + 1, model):
                    stopped_at = step + 1
                    log.info("fit stopped early at step %d", stopped_at)
                    break
    finally:
        bar.close()
        for m in moes:
            m.observer = None
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    report: dict[str, Any] = {
        "train": train, "window": window, "steps": stopped_at, "batch": batch, "seq_len": L, "lr": lr,
        "seed": seed, "balance_rate": balance_rate if moes else 0.0,
        "rows": {"train": len(train_rows), "held_out": len(held_rows)},
        "loss": {"first": losses[0], "last": float(np.mean(tail))},
        "seconds": round(seconds, 2), "threads": torch.get_num_threads(),
    }
    if len(held_rows):
        mean = torch.from_numpy(targets[train_rows].reshape(-1, targets.shape[2]).astype(np.float64).mean(0))
        report["held_out"] = evaluate(model, frames[held_rows], targets[held_rows], window=window, baseline=mean)
        h = report["held_out"]
        log.info("held-out MSE %.5g (normalised) vs %.5g predicting the training mean, over %d rows",
                 h["mse"], h["baseline_mse"], h["rows"])
    return report


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------

def save_package(model: Transformer, out: str | Path, *, report: dict[str, Any] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` (float, with its adapter) as an unquantized r1edge package; returns the manifest."""
    from sdk.compress import _version
    from sdk.package import FORMAT, FORMAT_VERSION, write_package

    if model.adapter is None:
        raise ValueError("the model has no I/O adapter; a fitted package is a sensor-mode package")
    cfg = model.config
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"r1edge {_version()}",
        "config": cfg.to_dict(),
        "quantization": {"scheme": "none"},
        "experts": {"kept": {}, "original_n_routed_experts": cfg.n_routed_experts},
        "io": model.adapter.signature(),
        "fit": report,
    }
    state = {k: v.detach().float() if v.is_floating_point() else v.detach()
             for k, v in model.state_dict().items()}
    return write_package(out, manifest, state, overwrite=overwrite)


def fit(source: str | Path, frames: np.ndarray, targets: np.ndarray, *, inputs: Sequence[str],
        outputs: Sequence[str], out: str | Path, train: str = "adapter", window: int | None = 32,
        steps: int = 500, lr: float = 2e-3, seed: int = 0, batch: int = 16, seq_len: int | None = None,
        held_out: float = 0.2, balance_rate: float = 1e-3, progress: bool = True,
        overwrite: bool = False) -> dict[str, Any]:
    """Load ``source``, attach a fresh adapter, fit it (or the whole model), write package ``out``.

    ``source``: an HF DeepSeek-V3 checkpoint directory or an unquantized r1edge package.
    ``frames`` [N, T, F] and ``targets`` [N, T, O] are named column by column by ``inputs``
    and ``outputs``. Returns the fit report (also stored in the package manifest under
    ``fit``), with ``package`` set to ``out``.
    """
    from sdk.loading import load_model
    from sdk.package import is_package, read_manifest

    source = Path(source)
    if is_package(source):
        scheme = read_manifest(source)["quantization"]["scheme"]
        if scheme != "none":
            raise ValueError(f"{source}: package is quantized ({scheme}); fit needs a float checkpoint "
                             "or an unquantized package")
    frames, targets = check_data(frames, targets, n_inputs=len(inputs), n_outputs=len(outputs))
    train_rows, _ = split_rows(frames.shape[0], held_out)
    model = load_model(source)
    attach_adapter(model, inputs, outputs, frames=frames[train_rows], targets=targets[train_rows], seed=seed)
    report = fit_model(model, frames, targets, train=train, window=window, steps=steps, lr=lr, batch=batch,
                   seq_len=seq_len, seed=seed, held_out=held_out, balance_rate=balance_rate, progress=progress)
    report["source"] = str(source)
    save_package(model, out, report=report, overwrite=overwrite)
    return {**report, "package": str(out)}


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

    from runtime.config import ModelConfig
    from sdk.compress import compress

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
    if report.get("package"):
        print(f"  package           {report['package']}")
