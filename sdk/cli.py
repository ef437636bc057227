"""The ``r1edge`` command line. Each subcommand is a small function over the sdk API."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def version() -> str:
    """The installed r1edge version (package metadata), or a note that it is not installed."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("r1edge")
    except PackageNotFoundError:
        return "(not installed: running from a source tree)"


def plain(text: str) -> str:
    """Docstring text for ``--help``: reST inline literals (double backticks) shown as plain text."""
    return text.replace("``", "")


def _print_report(report: dict, as_json: bool, render) -> None:
    """Print a report as JSON (``--json``) or through a human-readable renderer."""
    if as_json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        render(report)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``r1edge inspect PATH``: what a checkpoint or package contains."""
    from sdk.tools.loading import describe, render_description

    _print_report(describe(args.path), args.json, render_description)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``r1edge run DEPLOY.toml``: the controller's periodic loop with its bridges.

    Exit status: 0 for a healthy run, 1 when no valid input ever arrived or more cycles failed
    safe than ``[loop] max_failsafe_fraction`` allows (the reason is printed), 2 for a bad
    config or command line."""
    import signal

    from sdk.service.config import ConfigError, DeployConfig
    from sdk.service.controller import Controller
    from sdk.service.metrics import render_stats
    from sdk.service.replay import recording_source
    from runtime.control.recorder import RecordingReader
    from sdk.service.notify import ServiceMonitor

    config = DeployConfig.load(args.config, check_sources=not args.inputs)
    if not args.inputs and not config.has_bridges:
        raise ConfigError(f"{args.config}: no input source: configure [modbus], [zmq] or [opcua], or replay "
                          f"recorded inputs with --inputs RECORDING")
    if args.inputs:
        reader = RecordingReader(args.inputs)
        next(iter(reader), None)
        header = reader.header or {}
        if header.get("inputs") is None:
            raise ValueError(f"{args.inputs}: not a flight recording (no header record)")
        recorded = header["inputs"] + header.get("aux_inputs", [])     # the model's, then tracking/mode
        missing = [i.name for i in config.inputs if i.name not in recorded]
        if missing:
            raise ConfigError(f"{args.config}: inputs {', '.join(map(repr, missing))}: not in the recording "
                              f"{args.inputs} (it has {', '.join(recorded)})")
    par = config.model.parallel
    if par is not None and par.world_size > 1 and int(os.environ.get("RANK", "0")) != 0:
        from sdk.service.engines import ParallelRanks

        return ParallelRanks.join(config).serve(config)     # a torchrun rank that serves experts
    with Controller(config) as ctrl:
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
        stats["verdict"] = ctrl.verdict()
    _print_report(stats, args.json, render_stats)
    if not stats["verdict"]["ok"]:
        print(f"r1edge run: failed: {stats['verdict']['why']}", file=sys.stderr)
        return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``r1edge replay RECORDING``: re-run a flight recording; exit 1 unless bitwise identical."""
    from sdk.service.replay import render_replay, replay

    report = replay(args.recording, package=args.package, advisor_package=args.advisor_package)
    _print_report(report, args.json, render_replay)
    return 0 if report["identical"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """``r1edge bench PATH``: engine step latency per batch size, beside the reference."""
    from tqdm import tqdm

    from sdk.tools.bench import bench, render_bench

    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    with tqdm(total=len(batches), desc="bench", unit="batch", disable=args.json_file == "-") as bar:
        report = bench(args.path, batches=batches, device=args.device, steps=args.steps,
                       reference=not args.no_reference, threads=args.threads, progress=lambda _: bar.update())
    render_bench(report)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``r1edge generate PATH --prompt TEXT``: stream generated text; exit 1 unless the answer finished."""
    import time

    from sdk.tools.text import DecisionSchema, TextGenerator

    schema = DecisionSchema.from_file(args.schema) if args.schema else None
    gen = TextGenerator.load(args.path, window=args.window)
    deadline = time.monotonic() + args.deadline_ms / 1000 if args.deadline_ms is not None else None
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    result = gen.generate(args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                          max_think_tokens=args.max_think_tokens, schema=schema, deadline=deadline, on_text=stream)
    if args.json:
        _print_report(result.to_dict(), True, None)
    else:
        print()
        if result.decision is not None:
            print(f"decision: {json.dumps(result.decision)}")
        print(f"[{result.status}: {len(result.tokens)} tokens ({result.think_tokens} thinking) after "
              f"{result.prompt_tokens} prompt tokens, {result.tokens_per_s:.0f} tokens/s]", file=sys.stderr)
    return 0 if result.finished else 1


def cmd_keys(args: argparse.Namespace) -> int:
    """``r1edge keys OUT_DIR [--name NAME] [--signing]``: write a CURVE key pair for the ZeroMQ
    bridge, or with ``--signing`` an Ed25519 key pair for signing packages."""
    if args.signing:
        from sdk.tools.signing import fingerprint, load_public_key, make_signing_key

        private, public = make_signing_key(args.out_dir, args.name or "signing")
        print(f"private key: {private} (keep private: r1edge sign PKG --key {private})")
        print(f"public key:  {public} ({fingerprint(load_public_key(public))}; deploy it as "
              f"[model] public_key, check with r1edge verify PKG --key {public})")
        return 0
    from plc_bridge.zmq_clients import make_keys

    public, secret = make_keys(args.out_dir, args.name or "server")
    print(f"public key: {public}\nsecret key: {secret} (keep private)")
    print("Server: [zmq] curve = { secret_key = \"<path to NAME.key_secret>\", allowed = \"<dir of client .key files>\" }")
    print("Client: copy its NAME.key (public) into the server's 'allowed' directory.")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    """``r1edge sign PKG --key PRIVATE [--identity TEXT]``: sign a package (writes signature.json)."""
    from sdk.tools.signing import sign_package

    record = sign_package(args.package, args.key, args.identity)
    print(f"{args.package}: signed by {record['fingerprint']}"
          + (f" ({record['identity']})" if record["identity"] else ""))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``r1edge verify PKG --key PUBLIC [--key ...]``: exit 0 when the package is signed by one
    of the keys and unchanged since, 1 (with the reason) otherwise."""
    from sdk.tools.package import PackageError
    from sdk.tools.signing import verify_signed_package

    try:
        record = verify_signed_package(args.package, args.key)
    except PackageError as exc:
        print(f"INVALID: {exc}")
        return 1
    print(f"{args.package}: valid, signed by {record['fingerprint']}"
          + (f" ({record['identity']})" if record["identity"] else ""))
    return 0


def cmd_opcua_user(args: argparse.Namespace) -> int:
    """``r1edge opcua-user USERS.toml NAME``: add, replace or remove an OPC UA user, or map a
    client certificate to a role (``--certificate``)."""
    import getpass

    from plc_bridge.opcua_security import set_certificate, set_user

    if args.certificate is not None or (args.delete and args.certificate_entry):
        set_certificate(args.users, args.name, None if args.delete else args.certificate, args.role)
        print(f"{args.users}: certificate {args.name!r} " + ("removed" if args.delete else f"set ({args.role})"))
        return 0
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
    set_user(args.users, args.name, password, role=args.role)
    print(f"{args.users}: {args.name!r} set (scrypt, own salt)")
    return 0


def cmd_opcua_cert(args: argparse.Namespace) -> int:
    """``r1edge opcua-cert OUT_DIR``: a self-signed OPC UA application certificate and key."""
    from plc_bridge.opcua_security import make_certificate

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    cert, key = make_certificate(args.out_dir, args.name, uri=args.uri, hosts=hosts, client=args.client,
                                 days=args.days)
    print(f"certificate: {cert}\nprivate key: {key} (keep private)")
    if args.client:
        print("Copy the certificate into the server's [opcua] trusted_clients directory.")
    else:
        print("Server: [opcua] certificate = \"<path to the .der>\", private_key = \"<path to the .pem>\"")
    return 0


def cmd_modbus_cert(args: argparse.Namespace) -> int:
    """``r1edge modbus-cert OUT_DIR``: a CA, a server certificate and client certificates with a
    role, for Modbus/TCP Security (``[modbus.tls]``)."""
    from plc_bridge.modbus_tls import make_certificates

    hosts = [h.strip() for h in (args.server or "").split(",") if h.strip()]
    clients = []
    for item in args.client:
        name, sep, role = item.partition("=")
        if not sep or not name or not role:
            raise ValueError(f"--client {item!r}: write NAME=ROLE, e.g. --client scada=operator")
        clients.append((name, role))
    if not hosts and not clients:
        raise ValueError("nothing to make: give --server HOSTS and/or --client NAME=ROLE")
    for path in make_certificates(args.out_dir, server_hosts=hosts, clients=clients, days=args.days):
        print(f"{path}{' (keep private)' if path.suffix == '.key' else ''}")
    print("Server: [modbus.tls] cert = \"server.pem\", key = \"server.key\", ca = \"ca.pem\", "
          "write_roles = [\"operator\"]; give each client its NAME.pem, NAME.key and ca.pem")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``r1edge plan CONFIG_OR_PATH``: memory footprint by part and whether it fits the GPU(s)."""
    from sdk.tools.plan import plan, render_plan

    report = plan(args.source, keep_experts=args.keep_experts, quant=args.quant,
                  gpu_mem_gb=args.gpu_mem_gb, streams=args.streams, window=args.window,
                  kv_dtype=args.kv_dtype, reserve_gb=args.reserve_gb, engine=args.engine,
                  expert_cache_slots=args.expert_cache_slots, devices=args.devices)
    _print_report(report, args.json, render_plan)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """``r1edge compress SRC --out PKG --calib FILE``: calibrate, prune, quantize, write a package."""
    from sdk.tools.compress import compress, render_report
    from sdk.tools.slope import render_slope

    def progress_line(event: dict) -> None:
        print(json.dumps(event), file=sys.stderr, flush=True)

    manifest = compress(args.src, args.out, calib=args.calib, keep_experts=args.keep_experts,
                        keep_ratio=args.keep_ratio, quant=args.quant, method=args.method,
                        groups=args.groups, held_out=args.held_out, seed=args.seed, window=args.window,
                        progress=not args.json, overwrite=args.overwrite,
                        on_progress=progress_line if args.json else None)
    report = {k: v for k, v in manifest.items() if k not in ("files", "calibration")}
    report["calibration"] = {k: v for k, v in manifest["calibration"].items() if k != "layers"}
    report["package"] = args.out
    if not args.no_slope:
        from sdk.tools.slope import keep_slope

        report["keep_slope"] = keep_slope(args.src, args.calib, manifest, quant=args.quant, method=args.method,
                                          groups=args.groups, held_out=args.held_out, seed=args.seed,
                                          window=args.window)

    def render(r: dict) -> None:
        render_report(r)
        if r.get("keep_slope"):
            render_slope(r["keep_slope"])

    _print_report(report, args.json, render)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """``r1edge fit [SRC | --init PRESET] --data FILE.npz --out PKG``: fit a sensor-mode policy
    (exit 130 when stopped by SIGINT: the checkpoint keeps it for ``--resume``)."""
    from sdk.tools.fit import fit, load_data, render_fit, write_calibration

    data = load_data(args.data)
    names = {}
    for key, flag in (("inputs", "--inputs"), ("outputs", "--outputs")):
        given = getattr(args, key)
        names[key] = [n.strip() for n in given.split(",") if n.strip()] if given else data[key]
        if names[key] is None:
            raise ValueError(f"{args.data}: the file does not name its {key} "
                             f"({'feature_names' if key == 'inputs' else 'output_names'}); pass {flag} a,b,...")
    report = fit(args.src, data["frames"], data["targets"], inputs=names["inputs"], outputs=names["outputs"],
                 out=args.out, init=args.init, train=args.train, window=args.window, steps=args.steps, lr=args.lr,
                 seed=args.seed, batch=args.batch, seq_len=args.seq_len, held_out=args.held_out,
                 threads=args.threads, eval_every=args.eval_every, checkpoint=args.checkpoint, resume=args.resume,
                 progress=not args.json, overwrite=args.overwrite)
    if args.calib_out:
        rows = write_calibration(args.calib_out, data["frames"], report["window"])
        report["calibration"] = {"file": args.calib_out, "rows": rows, "window": report["window"]}
    _print_report(report, args.json, render_fit)
    return 130 if report.get("stopped_at") else 0


def _fit_epilog() -> str:
    from sdk.tools.fit import DATA_FORMAT, PRESETS

    lines = ["presets (--init; DeepSeek-V3 layout: MLA attention, 1 dense layer, then MoE layers with 1 shared",
             "expert; parameters with a 6-input, 2-output adapter; training step time on one thread):"]
    for name, p in PRESETS.items():
        c = p["config"]
        lines.append(f"  {name:7s}{p['params'] / 1e6:5.2f}M params ({p['active'] / 1e6:.2f}M active), hidden "
                     f"{c['hidden_size']}, {c['num_hidden_layers']} layers, {c['n_routed_experts']} experts "
                     f"top-{c['num_experts_per_tok']}, window {p['window']}, ~{p['step_ms'] / 1e3:.1f} s/step")
        lines.append(f"         suits {p['suits']}")
    lines += ["", "data (--data):", DATA_FORMAT, "",
              "Then: r1edge compress PKG --out PKG8 --calib CALIB.npz (write CALIB.npz with --calib-out), "
              "r1edge eval PKG8 --data FILE.npz --against PKG."]
    return "\n".join(lines)


def _epilog_on_help(parser: argparse.ArgumentParser, make_epilog) -> None:
    """Build ``parser``'s epilog only when its help is printed (``make_epilog`` may import torch)."""
    format_help = parser.format_help

    def format_help_with_epilog() -> str:
        if parser.epilog is None:
            parser.epilog = make_epilog()
        return format_help()
    parser.format_help = format_help_with_epilog


def cmd_eval(args: argparse.Namespace) -> int:
    """``r1edge eval PKG --data FILE.npz``: open-loop errors per output in the plant's units."""
    from sdk.tools.eval import evaluate, render_eval

    report = evaluate(args.package, args.data, against=args.against, window=args.window, config=args.config,
                      engine=args.engine, held_out=args.held_out)
    _print_report(report, args.json, render_eval)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``r1edge demo``: the factory loop over Modbus with the bundled MoE policy; exit 1 unless it passes."""
    from sdk.demo import render_demo, run_demo

    if not args.verbose:            # keep the status line clean: warnings, errors and start-up progress only
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("sdk.service.engines").setLevel(logging.INFO)
    tty = sys.stderr.isatty()
    if not args.json:
        print(f"r1edge demo: heated-tank PLC simulator (plant seed {args.seed}) on loopback Modbus TCP, "
              f"MoE policy in the loop for {args.duration:g} s ...", flush=True)
    summary = run_demo(args.duration, args.out, args.seed, status=sys.stderr, inplace=tty)
    _print_report(summary, args.json, render_demo)
    return 0 if summary["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="r1edge", description=plain(__doc__.splitlines()[0]))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kw) -> argparse.ArgumentParser:
        """A subcommand whose ``--help`` opens with its one-line help unless it has a description."""
        return sub.add_parser(name, help=help, description=kw.pop("description", help[0].upper() + help[1:] + "."),
                              **kw)

    p = command("inspect", help="show what a checkpoint or package contains")
    p.add_argument("path", help="HF checkpoint directory or r1edge package")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = command("run", help="run the controller loop of a deployment config with its bridges",
                       description="Run the controller's periodic loop with the bridges of DEPLOY.toml. Before the "
                       "first cycle it builds the engine (a first run compiles its Numba kernels, about 50 s on 2 cores), warms "
                       "it up and collects garbage, logging each stage. On stop (--duration, SIGINT, SIGTERM) the "
                       "outputs go to their fail-safe values (or hold, per output: on_stop = \"hold\") before "
                       "the bridges close. Exit status: 0 healthy; 1 when no valid input ever arrived or the "
                       "fail-safe fraction of cycles passed [loop] max_failsafe_fraction (default 0.5), or a rank of "
                       "[model] parallel failed, with the reason on stderr; 2 for a bad config or command line. "
                       "With [model] parallel the other ranks start here, or under torchrun every rank runs "
                       "this command (rank 0 the controller, the others their experts).")
    p.add_argument("config", metavar="DEPLOY.toml", help="deployment config")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="seconds to run (default: until SIGINT/SIGTERM)")
    p.add_argument("--inputs", metavar="RECORDING",
                   help="feed the inputs of a flight recording instead of the bridges' (outputs still go out)")
    p.add_argument("--repeat", action="store_true", help="with --inputs: start over at the end")
    p.add_argument("--json", action="store_true", help="print the final stats as JSON")
    p.set_defaults(func=cmd_run)

    p = command("replay", help="re-run a flight recording and check every output bit for bit")
    p.add_argument("recording", metavar="RECORDING",
                   help="recording directory (its latest run) or the run's first .r1rec segment")
    p.add_argument("--package", metavar="PKG", help="package to replay with (default: the one recorded)")
    p.add_argument("--advisor-package", metavar="PKG",
                   help="the advisor's language model to replay its answers with (default: the one recorded)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_replay)

    p = command("bench", help="decode-step latency per batch size, beside the reference")
    p.add_argument("path", help="HF checkpoint directory or r1edge package")
    p.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=100, help="timed steps per batch size (default 100)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers' eager model")
    p.add_argument("--threads", type=int, default=1,
                   help="Numba threads set for the run, as [loop] threads sets them (default 1; the CPU engine "
                        "runs each step on one thread, so only parallel kernels outside the step use more)")
    p.add_argument("--json", dest="json_file", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_bench)

    p = command("generate", help="generate text (or a JSON decision) from a prompt on the stream engine")
    p.add_argument("path", help="checkpoint directory or r1edge package with tokenizer.json")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user message with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="generated tokens at most, reasoning included (default: %(default)s)")
    p.add_argument("--max-think-tokens", type=int, default=None, metavar="N",
                   help="reasoning tokens inside <think> at most, then </think> is forced")
    p.add_argument("--schema", metavar="FILE.json",
                   help="JSON schema of the decision (bounded numbers, enums, booleans); constrains the answer")
    p.add_argument("--deadline-ms", type=float, default=None, metavar="MS",
                   help="give up (no decision) if the answer has not finished this long after the start")
    p.add_argument("--window", type=int, default=2048, metavar="W",
                   help="tokens per row, prompt plus generated (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, decision, think_tokens, tokens_per_s, ...)")
    p.set_defaults(func=cmd_generate)

    p = command("keys", help="write a CURVE key pair for the ZeroMQ bridge")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for NAME.key and NAME.key_secret")
    p.add_argument("--name", default=None, help="key file name (default: server, or signing with --signing)")
    p.add_argument("--signing", action="store_true",
                   help="an Ed25519 key pair for signing packages instead: NAME.pem (private) and NAME.pub")
    p.set_defaults(func=cmd_keys)

    p = command("sign", help="sign a package with an Ed25519 private key (writes PKG/signature.json)")
    p.add_argument("package", metavar="PKG", help="package directory")
    p.add_argument("--key", required=True, metavar="PRIVATE", help="PEM private key (r1edge keys OUT --signing)")
    p.add_argument("--identity", default=None, metavar="TEXT", help="who signs, e.g. 'ML team <ml@example.com>'")
    p.set_defaults(func=cmd_sign)

    p = command("verify", help="check a package's signature and files: exit 0 valid, 1 invalid")
    p.add_argument("package", metavar="PKG", help="package directory")
    p.add_argument("--key", required=True, action="append", metavar="PUBLIC",
                   help="trusted PEM public key (repeat for several)")
    p.set_defaults(func=cmd_verify)

    p = command("opcua-user", help="add, replace or remove a user of the OPC UA server's users file")
    p.add_argument("users", metavar="USERS.toml", help="users file ([opcua] users); created if absent")
    p.add_argument("name", metavar="NAME", help="user name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.add_argument("--role", choices=("viewer", "operator"), default=None,
                   help="viewer: browse and read; operator: also write inputs and the mode (default: the "
                        "user's present role, else operator; required with --certificate)")
    p.add_argument("--certificate", metavar="CERT", default=None,
                   help="map this client certificate (DER or PEM) to --role as certificates.NAME: an anonymous "
                        "session on a channel secured with it gets that role")
    p.add_argument("--certificate-entry", action="store_true",
                   help="with --delete: remove certificates.NAME instead of the user NAME")
    p.add_argument("--delete", action="store_true", help="remove the user")
    p.set_defaults(func=cmd_opcua_user)

    p = command("opcua-cert", help="write a self-signed OPC UA application certificate and key")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for NAME.der (certificate) and NAME.pem (key)")
    p.add_argument("--name", default="server", help="file name and common name (default: %(default)s)")
    p.add_argument("--uri", default=None,
                   help="application URI (default: urn:r1edge:NAME); a client's must be the URI its program "
                        "announces (asyncua's tools: urn:example.org:FreeOpcUa:opcua-asyncio)")
    p.add_argument("--hosts", default="localhost,127.0.0.1",
                   help="comma-separated DNS names and IP addresses (default: %(default)s)")
    p.add_argument("--client", action="store_true", help="a client certificate (for trusted_clients)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default: %(default)s)")
    p.set_defaults(func=cmd_opcua_cert)

    p = command("modbus-cert", help="write a CA and Modbus/TCP Security certificates (server, clients with a role)")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="directory for ca.pem/ca.key (made once, reused), server.pem/.key, NAME.pem/.key")
    p.add_argument("--server", metavar="HOSTS", help="make server.pem for these comma-separated DNS names and IP addresses")
    p.add_argument("--client", metavar="NAME=ROLE", action="append", default=[],
                   help="make NAME.pem with ROLE in its role extension (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default: %(default)s)")
    p.set_defaults(func=cmd_modbus_cert)

    from sdk.tools import plan as _plan
    p = command("plan", help="memory footprint by part and whether it fits a GPU")
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
    p.add_argument("--kv-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="latent cache dtype for --quant bf16/fp8 storage plans (default bf16); "
                        "the int8 engines hold it in fp32")
    p.add_argument("--reserve-gb", type=float, default=None,
                   help="runtime reserve: CUDA context, workspace, activations "
                        f"(default: {_plan.DEFAULT_RESERVE_GB} GB for the device engine, 0 for the CPU engine)")
    p.add_argument("--engine", choices=_plan.ENGINES, default="device",
                   help="int8 plans: what DeviceEngine holds on the GPU, or what the CPU Engine holds "
                        "(default: %(default)s)")
    p.add_argument("--expert-cache-slots", type=int, default=None, metavar="N",
                   help="device engine with the streaming expert store of N slots")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="expert parallel over N devices of --gpu-mem-gb each: routed experts split "
                        "contiguously, the rest on every device; per-device bytes and the traffic per step "
                        "for --streams rows (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)

    p = command("compress", help="calibrate, prune experts, quantize and write a package")
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
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="calibrate with the deployment's sliding attention window of W tokens "
                        "(default: causal over each whole row)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at --out")
    p.add_argument("--no-slope", action="store_true",
                   help="skip the neighbouring keep ratios (by default the source is also compressed with half "
                        "and twice the kept experts, to report what each costs on the held-out rows)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (with keep_slope); progress as one JSON object a line on "
                        "stderr (no bar)")
    p.set_defaults(func=cmd_compress)

    p = command("fit", help="fit a sensor-mode policy on recorded frames: from a checkpoint or from nothing",
                       description="Fit a sensor-mode policy on recorded frames and targets and write it as an "
                       "unquantized package for r1edge compress. Start from a checkpoint or unquantized package "
                       "(SRC: a fresh I/O adapter, fitted alone by default) or from nothing (--init: a seeded random "
                       "model, trained whole). The held-out error is measured as it goes and the package gets the "
                       "best state; the training state is checkpointed, so Ctrl-C stops at the end of a step "
                       "(exit 130) and --resume finishes it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _epilog_on_help(p, _fit_epilog)
    p.add_argument("src", metavar="SRC", nargs="?", help="HF checkpoint directory or unquantized package")
    p.add_argument("--init", metavar="PRESET", help="start from nothing: small, medium, large, or a config.json")
    p.add_argument("--data", required=True, metavar="FILE",
                   help=".npz with 'frames' [N,T,F] and 'targets' [N,T,O] (optional 'feature_names', 'output_names')")
    p.add_argument("--out", required=True, metavar="PKG", help="package directory to write")
    p.add_argument("--inputs", default=None, metavar="A,B,..", help="input names (default: from the file)")
    p.add_argument("--outputs", default=None, metavar="X,Y,..", help="output names (default: from the file)")
    p.add_argument("--train", choices=("adapter", "all"), default=None,
                   help="fit the adapter only, or the whole model (default: adapter from SRC, all with --init)")
    p.add_argument("--window", type=int, default=None,
                   help="attention window in frames, the deployment's [model] window (default: the preset's, else 32)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="crops per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="frames per crop (default: 3 x window)")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="fraction of rows (the last ones) held out to measure the fit (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s; small models train fastest on one, and the result "
                        "is bitwise reproducible for a given thread count)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="measure the held-out error and checkpoint every N steps (default: a tenth of the steps)")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="training state directory (default: PKG.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue a stopped fit from its checkpoint")
    p.add_argument("--calib-out", default=None, metavar="FILE.npz",
                   help="also write the frames cut into window-long rows, the calibration r1edge compress wants")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON (no progress bar)")
    p.set_defaults(func=cmd_fit)

    p = command("eval", help="judge a sensor-mode package on recorded rows, per output in its own units",
                       description="Run a sensor-mode package open loop over the rows of a fitting .npz, each "
                       "from its first frame as a controller would (an int8 package on the stream engine, bit for "
                       "bit what the controller computes; an unquantized one on the float model), and report per "
                       "output the RMS and largest error in the output's units and as a fraction of its range, "
                       "against the recorded targets (beside the error of always answering their mean) and, with "
                       "--against, against another package (e.g. the float package before compression).")
    p.add_argument("package", metavar="PKG", help="sensor-mode package")
    p.add_argument("--data", required=True, metavar="FILE.npz", help="'frames' [N,T,F] and 'targets' [N,T,O], as for fit")
    p.add_argument("--against", metavar="PKG2", help="also compare with this package's outputs on the same frames")
    p.add_argument("--config", metavar="DEPLOY.toml",
                   help="take the output ranges and the window from this deployment (default: the targets' span)")
    p.add_argument("--window", type=int, default=None,
                   help="history window (default: the deployment's, else the package's fit, else 32)")
    p.add_argument("--engine", choices=("auto", "stream", "float"), default="auto",
                   help="auto: int8 packages on the stream engine, float ones on the float model (default)")
    p.add_argument("--held-out", type=float, default=0.0,
                   help="only the last fraction of the rows, as fit holds them out (default: all rows)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval)

    p = command("demo", help="the factory loop over Modbus TCP with the bundled MoE policy")
    p.add_argument("--duration", type=float, default=20.0, metavar="S",
                   help="seconds of real time in the loop (default: %(default)s); at least 2 s after the "
                        "seed's first setpoint step (3-7 s in), which the score needs")
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
