"""Command line: `nbiafs serve`, `nbiafs mount`, `nbiafs demo`.

The CLI only turns arguments into typed configuration and calls the component;
every expected failure ends in one line on stderr and a non-zero exit status,
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from nbiafs import __version__

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """An expected failure: its message is printed as one line, then exit status 1."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _rate(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbiafs", description="The Cancer Imaging Archive (NBIA REST API) as a read-only filesystem.")
    parser.add_argument("--version", action="version", version=f"nbiafs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_serve(sub)
    return parser


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run a local NBIA-compatible archive",
                       description="Serve a synthetic archive or a folder of DICOM files as an NBIA "
                                   "REST API. Prints the root URL as its first line.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="port; 0 takes a free one (default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", default="demo",
                     help="demo, test, bench, or a grid CxPxSTxSExI[@MATRIX] (default: demo)")
    src.add_argument("--dicom-dir", metavar="DIR", help="serve the DICOM files below DIR instead")
    p.add_argument("--seed", type=int, help="seed of the synthetic archive")
    p.add_argument("--noise-hu", type=_positive_float, help="noise added to the phantom (HU)")
    p.add_argument("--data-dir", metavar="DIR", help="where generated archives are kept")
    p.add_argument("--users", metavar="FILE", help='JSON {"user": "password"} of named users')
    p.add_argument("--token-lifetime", type=_positive_float, default=7200.0, metavar="SECONDS")
    p.add_argument("--refresh-lifetime", type=_positive_float, default=7200.0, metavar="SECONDS")
    f = p.add_argument_group("network shaping and faults")
    f.add_argument("--latency-ms", type=_positive_float, default=0.0)
    f.add_argument("--slow-metadata-ms", type=_positive_float, default=0.0,
                   help="extra delay of getSeries and getSeriesSize")
    f.add_argument("--connection-mbit", type=_positive_float, default=0.0,
                   help="bandwidth cap per connection (Mbit/s)")
    f.add_argument("--total-mbit", type=_positive_float, default=0.0,
                   help="bandwidth cap of all connections (Mbit/s)")
    f.add_argument("--image-outage", action="store_true", help="image requests answer 500")
    f.add_argument("--image-error-rate", type=_rate, default=0.0)
    f.add_argument("--stall", choices=["all", "images"], help="accept requests, never answer")
    f.add_argument("--truncate-images", type=_rate, default=0.0, metavar="RATE")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from pathlib import Path

    from nbiafs.archive.content import load_dicom_dir, load_synthetic
    from nbiafs.archive.faults import Faults
    from nbiafs.archive.server import LocalArchive
    from nbiafs.archive.spec import parse_spec
    from nbiafs.archive.tokens import TokenStore

    try:
        if args.dicom_dir:
            if not Path(args.dicom_dir).is_dir():
                raise CliError(f"--dicom-dir {args.dicom_dir}: not a directory")
            index = load_dicom_dir(Path(args.dicom_dir))
        else:
            spec = parse_spec(args.spec, seed=args.seed, noise_hu=args.noise_hu)
            index = load_synthetic(spec, Path(args.data_dir) if args.data_dir else None)
        users = TokenStore.load_users(Path(args.users)) if args.users else None
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    faults = Faults(latency_s=args.latency_ms / 1000, slow_metadata_s=args.slow_metadata_ms / 1000,
                    connection_mbit_s=args.connection_mbit, total_mbit_s=args.total_mbit,
                    image_outage=args.image_outage, image_error_rate=args.image_error_rate,
                    stall=args.stall or "", truncate_images=args.truncate_images)
    tokens = TokenStore(users, access_lifetime_s=args.token_lifetime,
                        refresh_lifetime_s=args.refresh_lifetime)
    try:
        archive = LocalArchive(index, tokens, faults, host=args.host, port=args.port)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    archive.start()
    print(archive.url, flush=True)
    wait_for_signal()
    archive.stop()
    return 0


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass


def setup_logging(level: str) -> None:
    try:
        logging.basicConfig(level=level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    except ValueError:
        raise CliError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level)
        return args.func(args) or 0
    except CliError as exc:
        print(f"nbiafs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
