"""The ``r1edge`` command line. Each subcommand is a small function over the sdk API."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _print_report(report: dict, as_json: bool, render) -> None:
    """Print a report as JSON (``--json``) or through a human-readable renderer."""
    if as_json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        render(report)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``r1edge inspect PATH``: what a checkpoint or package contains."""
    from sdk.loading import describe, render_description

    _print_report(describe(args.path), args.json, render_description)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``r1edge run DEPLOY.toml``: the controller's periodic loop with its bridges."""
    import signal

    from sdk.controller import Controller, recording_source, render_stats
    from sdk.notify import ServiceMonitor

    with Controller.from_config(args.config) as ctrl:
        source = recording_source(args.inputs, loop=args.repeat) if args.inputs else None
        service = ServiceMonitor.from_env(ctrl)           # systemd notify when NOTIFY_SOCKET is set

        def shutdown(*_):
            if service is not None:
                service.stopping()
            ctrl.stop()
        handlers = {sig: signal.signal(sig, shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if service is not None:
                service.start()
            stats = ctrl.run(args.duration, source=source)
        finally:
            if service is not None:
                service.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    _print_report(stats, args.json, render_stats)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``r1edge replay RECORDING``: re-run a flight recording; exit 1 unless bitwise identical."""
    from sdk.controller import render_replay, replay

    report = replay(args.recording, package=args.package)
    _print_report(report, args.json, render_replay)
    return 0 if report["identical"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """``r1edge bench PATH``: engine step latency per batch size, beside the reference."""
    from tqdm import tqdm

    from sdk.bench import bench, render_bench

    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    with tqdm(total=len(batches), desc="bench", unit="batch", disable=args.json_file == "-") as bar:
        report = bench(args.path, batches=batches, device=args.device, steps=args.steps,
                       reference=not args.no_reference, threads=args.threads, progress=lambda _: bar.update())
    render_bench(report)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """``r1edge keys OUT_DIR [--name NAME]``: write a CURVE key pair for the ZeroMQ bridge."""
    from plc_bridge.zmq_bridge import make_keys

    public, secret = make_keys(args.out_dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep private)")
    print("Server: [zmq] curve = { secret_key = \"<path to NAME.key_secret>\", allowed = \"<dir of client .key files>\" }")
    print("Client: copy its NAME.key (public) into the server's 'allowed' directory.")
    return 0


def cmd_opcua_user(args: argparse.Namespace) -> int:
    """``r1edge opcua-user USERS.toml NAME``: add, replace or remove an OPC UA user."""
    import getpass

    from plc_bridge.opcua import set_user

    if args.delete:
        set_user(args.users, args.name, None)
        print(f"{args.users}: removed {args.name!r}")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ")
    set_user(args.users, args.name, password)
    print(f"{args.users}: {args.name!r} set (scrypt, own salt)")
    return 0


def cmd_opcua_cert(args: argparse.Namespace) -> int:
    """``r1edge opcua-cert OUT_DIR``: a self-signed OPC UA application certificate and key."""
    from plc_bridge.opcua import make_certificate

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    cert, key = make_certificate(args.out_dir, args.name, uri=args.uri, hosts=hosts, client=args.client,
                                 days=args.days)
    print(f"certificate: {cert}\nprivate key: {key} (keep private)")
    if args.client:
        print("Copy the certificate into the server's [opcua] trusted_clients directory.")
    else:
        print("Server: [opcua] certificate = \"<path to the .der>\", private_key = \"<path to the .pem>\"")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``r1edge plan CONFIG_OR_PATH``: memory footprint by part and whether it fits the GPU."""
    from sdk.plan import plan, render_plan

    report = plan(args.source, keep_experts=args.keep_experts, quant=args.quant,
                  gpu_mem_gb=args.gpu_mem_gb, streams=args.streams, window=args.window,
                  kv_dtype=args.kv_dtype, reserve_gb=args.reserve_gb)
    _print_report(report, args.json, render_plan)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """``r1edge compress SRC --out PKG --calib FILE``: calibrate, prune, quantize, write a package."""
    from sdk.compress import compress, render_report

    manifest = compress(args.src, args.out, calib=args.calib, keep_experts=args.keep_experts,
                        keep_ratio=args.keep_ratio, quant=args.quant, method=args.method,
                        groups=args.groups, held_out=args.held_out, seed=args.seed,
                        progress=not args.json, overwrite=args.overwrite)
    report = {k: v for k, v in manifest.items() if k not in ("files", "calibration")}
    report["calibration"] = {k: v for k, v in manifest["calibration"].items() if k != "layers"}
    report["package"] = args.out
    _print_report(report, args.json, render_report)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """``r1edge fit SRC --data FILE.npz --out PKG``: attach a sensor adapter and fit it (or the whole model)."""
    from sdk.fit import fit, load_data, render_fit

    data = load_data(args.data)
    names = {}
    for key, flag in (("inputs", "--inputs"), ("outputs", "--outputs")):
        given = getattr(args, key)
        names[key] = [n.strip() for n in given.split(",") if n.strip()] if given else data[key]
        if names[key] is None:
            raise ValueError(f"{args.data}: the file does not name its {key} "
                             f"({'feature_names' if key == 'inputs' else 'output_names'}); pass {flag} a,b,...")
    report = fit(args.src, data["frames"], data["targets"], inputs=names["inputs"], outputs=names["outputs"],
                 out=args.out, train=args.train, window=args.window, steps=args.steps, lr=args.lr,
                 seed=args.seed, batch=args.batch, seq_len=args.seq_len, held_out=args.held_out,
                 progress=not args.json, overwrite=args.overwrite)
    _print_report(report, args.json, render_fit)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``r1edge demo``: the factory loop over Modbus with the bundled MoE policy; exit 1 unless it passes."""
    from sdk.demo import render_demo, run_demo

    if not args.verbose:            # keep the status line clean: warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    tty = sys.stderr.isatty()
    if not args.json:
        print(f"r1edge demo: heated-tank PLC simulator (plant seed {args.seed}) on loopback Modbus TCP, "
              f"MoE policy in the loop for {args.duration:g} s ...", flush=True)
    summary = run_demo(args.duration, args.out, args.seed, status=sys.stderr, inplace=tty)
    _print_report(summary, args.json, render_demo)
    return 0 if summary["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="r1edge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show what a checkpoint or package contains")
    p.add_argument("path", help="HF checkpoint directory or r1edge package")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="run the controller loop of a deployment config with its bridges")
    p.add_argument("config", metavar="DEPLOY.toml", help="deployment config")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="seconds to run (default: until SIGINT/SIGTERM)")
    p.add_argument("--inputs", metavar="RECORDING",
                   help="feed the inputs of a flight recording instead of the bridges' (outputs still go out)")
    p.add_argument("--repeat", action="store_true", help="with --inputs: start over at the end")
    p.add_argument("--json", action="store_true", help="print the final stats as JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="re-run a flight recording and check every output bit for bit")
    p.add_argument("recording", metavar="RECORDING",
                   help="recording directory (its latest run) or the run's first .r1rec segment")
    p.add_argument("--package", metavar="PKG", help="package to replay with (default: the one recorded)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("bench", help="decode-step latency per batch size, beside the reference")
    p.add_argument("path", help="HF checkpoint directory or r1edge package")
    p.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=100, help="timed steps per batch size (default 100)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers' eager model")
    p.add_argument("--threads", type=int, default=1, help="compute threads per CPU engine step (default 1)")
    p.add_argument("--json", dest="json_file", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("keys", help="write a CURVE key pair for the ZeroMQ bridge")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for NAME.key and NAME.key_secret")
    p.add_argument("--name", default="server", help="key file name (default: %(default)s)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("opcua-user", help="add, replace or remove a user of the OPC UA server's users file")
    p.add_argument("users", metavar="USERS.toml", help="users file ([opcua] users); created if absent")
    p.add_argument("name", metavar="NAME", help="user name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.add_argument("--delete", action="store_true", help="remove the user")
    p.set_defaults(func=cmd_opcua_user)

    p = sub.add_parser("opcua-cert", help="write a self-signed OPC UA application certificate and key")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for NAME.der (certificate) and NAME.pem (key)")
    p.add_argument("--name", default="server", help="file name and common name (default: %(default)s)")
    p.add_argument("--uri", default=None, help="application URI (default: urn:r1edge:NAME)")
    p.add_argument("--hosts", default="localhost,127.0.0.1",
                   help="comma-separated DNS names and IP addresses (default: %(default)s)")
    p.add_argument("--client", action="store_true", help="a client certificate (for trusted_clients)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default: %(default)s)")
    p.set_defaults(func=cmd_opcua_cert)

    from sdk import plan as _plan
    p = sub.add_parser("plan", help="memory footprint by part and whether it fits a GPU")
    p.add_argument("source", metavar="CONFIG_OR_PATH",
                   help="config.json, checkpoint directory, package, or 'deepseek-r1'")
    p.add_argument("--keep-experts", type=int, default=None, metavar="N",
                   help="routed experts kept per MoE layer (default: all)")
    p.add_argument("--quant", choices=_plan.QUANTS, default=None,
                   help="weight format (default: int8; a package's own scheme)")
    p.add_argument("--gpu-mem-gb", type=float, default=_plan.DEFAULT_GPU_MEM_GB, metavar="G",
                   help="GPU memory in GB of 1e9 bytes (default: %(default)s)")
    p.add_argument("--streams", type=int, default=_plan.DEFAULT_STREAMS, metavar="S",
                   help="concurrent streams in the KV cache (default: %(default)s)")
    p.add_argument("--window", type=int, default=_plan.DEFAULT_WINDOW, metavar="W",
                   help="tokens cached per stream (default: %(default)s)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="KV cache dtype (default: %(default)s)")
    p.add_argument("--reserve-gb", type=float, default=_plan.DEFAULT_RESERVE_GB,
                   help="runtime reserve: CUDA context, workspace, activations (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compress", help="calibrate, prune experts, quantize and write a package")
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory (or an unquantized package)")
    p.add_argument("--out", required=True, metavar="PKG", help="package directory to write")
    p.add_argument("--calib", required=True, metavar="FILE",
                   help=".jsonl of {\"input_ids\": [...]}, .npy/.npz ids [N,T], or .npz 'frames' [N,T,F]")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-experts", type=int, metavar="N", help="routed experts kept per MoE layer")
    keep.add_argument("--keep-ratio", type=float, metavar="R", help="fraction of routed experts kept")
    p.add_argument("--quant", choices=("int8", "none"), default="int8", help="weights (default: int8)")
    p.add_argument("--method", choices=("reap", "frequency", "random"), default="reap",
                   help="expert score used for pruning (default: reap)")
    p.add_argument("--groups", choices=("auto", "balanced", "global"), default="auto",
                   help="group-limited routing after pruning (default: auto)")
    p.add_argument("--held-out", type=float, default=0.25,
                   help="fraction of calibration rows kept for the quality report (default: 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON (no progress bar)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("fit", help="attach a sensor I/O adapter and fit it on recorded frames")
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory or unquantized package")
    p.add_argument("--data", required=True, metavar="FILE",
                   help=".npz with 'frames' [N,T,F] and 'targets' [N,T,O] (optional 'feature_names', 'output_names')")
    p.add_argument("--out", required=True, metavar="PKG", help="package directory to write")
    p.add_argument("--inputs", default=None, metavar="A,B,..", help="input names (default: from the file)")
    p.add_argument("--outputs", default=None, metavar="X,Y,..", help="output names (default: from the file)")
    p.add_argument("--train", choices=("adapter", "all"), default="adapter",
                   help="fit the adapter only, or the whole model (default: %(default)s)")
    p.add_argument("--window", type=int, default=32, help="attention window in frames (default: %(default)s)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="crops per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="frames per crop (default: 3 x window)")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="fraction of rows held out for the report (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON (no progress bar)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("demo", help="the factory loop over Modbus TCP with the bundled MoE policy")
    p.add_argument("--duration", type=float, default=20.0, metavar="S",
                   help="seconds of real time in the loop (default: %(default)s)")
    p.add_argument("--out", default="r1edge-demo", metavar="DIR",
                   help="plot, flight recording and plant log go here (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="plant seed: setpoints and disturbances (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``r1edge`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"r1edge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
