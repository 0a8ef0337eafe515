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


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (not argparse's usage block), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def build_parser(mount_defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nbiafs", description="The Cancer Imaging Archive (NBIA REST API) as a read-only filesystem.",
        epilog="examples:\n"
               "  nbiafs demo                        a local demo archive, mounted at ./nbia-demo\n"
               "  nbiafs mount ~/tcia                TCIA's public collections (guest)\n"
               "  NBIA_USER=me nbiafs mount ~/tcia   with your account (password from NBIA_PASSWORD,\n"
               "                                     ~/.netrc or a prompt)\n"
               "  nbiafs status ~/tcia               what the mount is doing\n"
               "  fusermount -u ~/tcia               unmount\n"
               "more: nbiafs COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nbiafs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_mount(sub, mount_defaults or {})
    _add_prefetch(sub)
    _add_status(sub)
    _add_cache(sub)
    _add_demo(sub)
    _add_serve(sub)
    return parser


def _add_client_options(p) -> None:
    p.add_argument("--url", default="tcia", metavar="ROOT",
                   help="archive root URL, or a preset: tcia (default: "
                        "https://nbia.cancerimagingarchive.net/nbia-api), nlst")
    p.add_argument("--api", choices=["auto", "v4", "v2", "v1"], default="auto",
                   help="auto (default): v4 if the archive speaks it, else v2, else v1; v4: no token "
                        "for the guest; v2: token session; v1: anonymous, public collections only")
    p.add_argument("--user", metavar="NAME",
                   help="TCIA user (default: NBIA_USER, else the guest); the password comes from "
                        "NBIA_PASSWORD, ~/.netrc or a prompt, never from the command line")
    p.add_argument("--cache-dir", metavar="DIR", help="default: $XDG_CACHE_HOME/nbiafs")
    p.add_argument("--cache-size", default="20G", metavar="SIZE",
                   help="instance cache limit, e.g. 500M, 20G (default: 20G)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the archive's TLS certificate (prints a warning)")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   help="longest a call may wait on the archive, retries included, before it fails "
                        "with EIO (default: 60 for listings, 120 for a file)")
    p.add_argument("--log-level", default="WARNING", metavar="LEVEL",
                   help="DEBUG, INFO, WARNING (default) or ERROR")


def _add_mount(sub, defaults: dict) -> argparse.ArgumentParser:
    p = sub.add_parser("mount", help="mount the archive read-only at MOUNTPOINT",
                       description="Mount the archive as /Collection/PatientID/StudyInstanceUID/"
                                   "SeriesInstanceUID/SOPInstanceUID.dcm (read-only). "
                                   "Unmount with: fusermount -u MOUNTPOINT",
                       epilog="examples:\n  nbiafs mount ~/tcia\n"
                              "  NBIA_USER=me nbiafs mount --cache-size 100G ~/tcia\n"
                              "  nbiafs mount --url nlst -o cache_size=50G,timeout=30 ~/nlst\n"
                              "  nbiafs status ~/tcia; fusermount -u ~/tcia\n"
                              "defaults: ~/.config/nbiafs/config.toml (keys as the long options, "
                              "e.g. cache_size = \"100G\"); fstab: see the README",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_client_options(p)
    p.add_argument("--connections", type=int, default=8, metavar="N",
                   help="concurrent downloads when prefetching a series (default: 8)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="fetch only the files that are opened, never the rest of their series")
    p.add_argument("--no-verify-md5", action="store_true",
                   help="do not check downloads against the archive's md5 (v4's getMD5HashForImage and "
                        "the zips' md5hashes.csv); sizes, DICM and zip CRCs are still checked")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users read the mount (needs user_allow_other in /etc/fuse.conf)")
    p.add_argument("--collection", action=_AppendOverDefault, default=[], metavar="NAME",
                   help="show only this collection (repeatable)")
    p.add_argument("--modality", action=_AppendOverDefault, default=[], metavar="CT",
                   help="show only series of this modality (repeatable)")
    p.add_argument("--manifest", metavar="FILE.tcia", help="show only the series of a TCIA portal manifest")
    p.add_argument("--cart", metavar="NAME", help="show only the series of a shared cart")
    p.add_argument("--names", choices=["uid", "readable"], default="uid",
                   help="study and series folders by UID (default) or readable: "
                        "'<date> <description> [<UID digits>]'; UID paths resolve either way")
    p.add_argument("--previews", action="store_true",
                   help="a .preview.png (middle slice) in each series folder")
    p.add_argument("--shared-cache", metavar="s3://BUCKET/PREFIX",
                   help="a second-level cache in S3-compatible storage shared by a cluster's mounts, so each "
                        "instance is fetched from the archive once; endpoint and credentials as boto3 takes "
                        "them (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
    p.add_argument("--source", choices=["auto", "tcia", "idc"], default="auto",
                   help="where instance bytes come from: auto (default): IDC's public S3 mirror for the series "
                        "it holds byte for byte, verified against TCIA's md5 (used for TCIA's own servers, or "
                        "when --idc-index is given), TCIA otherwise; tcia: never S3; idc: as auto, for any "
                        "archive, and the mount refuses to start without IDC's series index")
    p.add_argument("--idc-index", metavar="FILE.parquet",
                   help="IDC's series index (idc_index.parquet; default: the one of the installed "
                        "idc-index-data, pip install 'nbiafs[idc]'); S3 endpoint as boto3 takes it "
                        "(AWS_ENDPOINT_URL_S3)")
    p.add_argument("-o", dest="options", action="append", metavar="OPT[=VAL],…",
                   help="options as in fstab, e.g. -o cache_size=50G,timeout=30,allow_other")
    p.add_argument("--config", metavar="FILE", help="settings file (default: ~/.config/nbiafs/config.toml)")
    p.add_argument("--log-file", metavar="FILE", help="log there (default: stderr; lost in the background)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (DEBUG)")
    p.set_defaults(func=run_mount, log_level="INFO")
    p.set_defaults(**defaults)
    return p


def mount_parser() -> argparse.ArgumentParser:
    """The parser of `nbiafs mount` alone (for `nbiafs.mounted()`'s keyword options)."""
    return _add_mount(_Parser(prog="nbiafs").add_subparsers(), {})


def _add_prefetch(sub) -> None:
    p = sub.add_parser("prefetch", help="fetch series, studies, patients or collections into the cache",
                       description="Warm a mount's cache ahead of a job: every instance below each "
                                   "PATH (on an nbiafs mount) is fetched, with progress. Resumable: "
                                   "what is cached already is skipped.",
                       epilog="example:\n  nbiafs prefetch ~/tcia/LIDC-IDRI/LIDC-IDRI-0001",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--jobs", "-j", type=int, default=4, metavar="N",
                   help="files opened at once (default: 4); the mount's own prefetch does the rest")
    p.add_argument("--log-level", default="WARNING", metavar="LEVEL")
    p.set_defaults(func=run_prefetch)


def run_prefetch(args) -> int:
    from pathlib import Path

    from nbiafs.warm import WarmError, run

    try:
        return run([Path(p) for p in args.paths], jobs=args.jobs)
    except WarmError as exc:
        raise CliError(str(exc)) from None


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="what a mount is doing: archive, user, token, cache, downloads, errors",
                       description="Print the status of the nbiafs mount at MOUNTPOINT "
                                   "(the same text as MOUNTPOINT/.nbiafs/status).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--log-level", default="WARNING", metavar="LEVEL", help=argparse.SUPPRESS)
    p.set_defaults(func=run_status)


def run_status(args) -> int:
    from pathlib import Path

    from nbiafs.status import STATUS_DIR, STATUS_FILE

    path = Path(args.mountpoint) / STATUS_DIR / STATUS_FILE
    try:
        text = path.read_text()
    except OSError:
        raise CliError(f"{args.mountpoint} is not an nbiafs mount (no {STATUS_DIR}/{STATUS_FILE})") from None
    sys.stdout.write(text)
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the cache directory (outside a mount)",
                       description="info: each archive and user cached, its size and last use. "
                                   "clear: delete them (caches in use by a running mount are left "
                                   "alone and reported).",
                       epilog="examples:\n  nbiafs cache info\n  nbiafs cache clear --cache-dir /scratch/nbiafs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--cache-dir", metavar="DIR", help="default: $XDG_CACHE_HOME/nbiafs")
    p.add_argument("--log-level", default="WARNING", metavar="LEVEL", help=argparse.SUPPRESS)
    p.set_defaults(func=run_cache)


def run_cache(args) -> int:
    from pathlib import Path

    from nbiafs.config import CacheConfig
    from nbiafs.status import clear_indexes, clear_scopes, format_scopes, reduced_indexes, scopes

    root = Path(args.cache_dir).expanduser().absolute() if args.cache_dir else CacheConfig().root
    infos, indexes = scopes(root), reduced_indexes(root)
    if args.action == "info":
        sys.stdout.write(format_scopes(root, infos, indexes))
        return 0
    cleared, busy = clear_scopes(infos)
    gone, held = clear_indexes(indexes)
    print(f"cleared {len(cleared)} cache(s) in {root}"
          + (f", and {len(gone)} reduced IDC series index(es)" if gone else ""))
    left = [f"{s.url} ({s.user or 'anonymous'})" for s in busy] + [f"IDC series index {i.path.name}" for i in held]
    if left:
        raise CliError(f"{len(left)} cache(s) in use by a running mount were left alone: " + ", ".join(left))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="serve the demo archive locally and mount it",
                       description="Start the local NBIA-compatible archive with its demo content, "
                                   "mount it (with previews), and show what to try. Ctrl-C unmounts "
                                   "and stops.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", default="nbia-demo",
                   help="default: ./nbia-demo (created if missing)")
    p.add_argument("--names", choices=["uid", "readable"], default="readable",
                   help="study and series folders readable (default: '<date> <description> [<UID "
                        "digits>]') or by UID; UID paths resolve either way")
    p.add_argument("--shared-cache", action="store_true",
                   help="also start a local S3 object store (SeaweedFS) and mount with it as the shared "
                        "second-level cache, as the nodes of a cluster do")
    p.add_argument("--idc", action="store_true",
                   help="also start a local S3 object store (SeaweedFS) holding a copy of the demo's series "
                        "laid out as IDC's public mirror of TCIA (one left out), and mount with --source auto "
                        "and its index: files come from it where they are the archive's bytes")
    p.add_argument("--log-level", default="WARNING", metavar="LEVEL")
    p.set_defaults(func=run_demo)


class _AppendOverDefault(argparse.Action):
    """Repeatable like `append`, but the flags replace a default list (from the config file or
    -o) instead of adding to it: flags win."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = f"_{self.dest}_given"
        items = list(getattr(namespace, self.dest) or []) if getattr(namespace, seen, False) else []
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, items + [values])


def mount_config(args, root_url: str | None = None, cache_dir=None):
    from dataclasses import replace
    from pathlib import Path

    from nbiafs.api.client import API_CHOICES, PRESETS, ClientConfig
    from nbiafs.config import CacheConfig, MountConfig, parse_size
    from nbiafs.idc import MirrorConfig
    from nbiafs.prefetch import PrefetchConfig

    try:
        size = parse_size(args.cache_size)
    except ValueError as exc:
        raise CliError(f"--cache-size: {exc}") from None
    connections = getattr(args, "connections", 8)
    if not 1 <= connections <= 64:
        raise CliError(f"--connections {connections}: use 1 to 64")
    prefetch = PrefetchConfig(connections=connections, enabled=not getattr(args, "no_prefetch", False))
    root = root_url or PRESETS.get(args.url, args.url)
    if not root.startswith(("http://", "https://")):
        raise CliError(f"--url {args.url}: not an http(s) URL or a preset (tcia, nlst)")
    cache = CacheConfig(max_bytes=size)
    if cache_dir or args.cache_dir:
        cache = replace(cache, root=Path(cache_dir or args.cache_dir).expanduser().absolute())
    if args.api not in API_CHOICES:  # from a config file or -o, which argparse does not check
        raise CliError(f"api = {args.api!r}: use {', '.join(API_CHOICES)}")
    client = ClientConfig(root_url=root, api=args.api)
    if getattr(args, "insecure", False):
        print(f"nbiafs: warning: TLS certificates of {root} are NOT verified (--insecure); "
              "anyone on the network path can read or alter what the mount serves", file=sys.stderr)
        client = replace(client, verify_tls=False)
    if getattr(args, "timeout", None):
        client = replace(client, metadata_budget_s=args.timeout, image_budget_s=args.timeout)
    if getattr(args, "no_verify_md5", False):
        client = replace(client, verify_md5=False)
    names = getattr(args, "names", "uid")
    if names not in ("uid", "readable"):  # from a config file or -o, which argparse does not check
        raise CliError(f"names = {names!r}: use uid or readable")
    manifest = None
    if getattr(args, "manifest", None):
        from nbiafs.manifest import ManifestError, parse_manifest
        try:
            manifest = tuple(parse_manifest(Path(args.manifest).expanduser()))
        except ManifestError as exc:
            raise CliError(str(exc)) from None
    shared_cache = None
    if getattr(args, "shared_cache", None):
        from nbiafs.tier import parse_tier_url
        try:
            shared_cache = parse_tier_url(args.shared_cache)
        except ValueError as exc:
            raise CliError(f"--shared-cache: {exc}") from None
    source = getattr(args, "source", "auto")
    if source not in ("auto", "tcia", "idc"):  # from a config file or -o, which argparse does not check
        raise CliError(f"source = {source!r}: use auto, tcia or idc")
    idc_index = getattr(args, "idc_index", None)
    if idc_index and source == "tcia":
        raise CliError("--idc-index has no use with --source tcia")
    mirror = MirrorConfig(source=source, index=Path(idc_index).expanduser().absolute() if idc_index else None)
    return MountConfig(mountpoint=Path(args.mountpoint).expanduser().absolute(),
                       client=client, cache=cache, prefetch=prefetch,
                       user=args.user, foreground=args.foreground, allow_other=args.allow_other,
                       collections=tuple(getattr(args, "collection", ()) or ()),
                       modalities=tuple(getattr(args, "modality", ()) or ()),
                       manifest_series=manifest, cart=getattr(args, "cart", None),
                       names=names, previews=getattr(args, "previews", False), shared_cache=shared_cache,
                       mirror=mirror)


def run_mount(args) -> int:
    from nbiafs.background import watch_parent
    from nbiafs.mount import MountError, run

    config = mount_config(args)
    watch_parent()  # started by nbiafs.mounted(): end with that process
    try:
        run(config)
    except MountError as exc:
        raise CliError(str(exc)) from None
    return 0


def run_demo(args) -> int:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from nbiafs.archive.content import load_synthetic
    from nbiafs.archive.server import LocalArchive
    from nbiafs.mount import MountError, run

    mountpoint = Path(args.mountpoint).absolute()
    created = not mountpoint.exists()
    if created:
        mountpoint.mkdir(parents=True)
    print("Preparing the demo archive (generated once, then reused)...", file=sys.stderr, flush=True)
    archive = LocalArchive(load_synthetic("demo")).start()
    cache_dir = tempfile.mkdtemp(prefix="nbiafs-demo-cache-")
    store = None
    args.url, args.api, args.user, args.cache_dir, args.cache_size = archive.url, "auto", None, None, "1G"
    args.foreground, args.allow_other, args.timeout, args.previews = True, False, None, True
    wants_store, args.shared_cache = args.shared_cache, None
    args.source, args.idc_index = "auto", None
    mirror = None
    try:
        if getattr(args, "idc", False):
            mirror, args.idc_index = _demo_mirror(archive)
        if wants_store:
            from nbiafs.archive.objectstore import LocalObjectStore
            print("Starting a local S3 object store (SeaweedFS) for the shared cache...", file=sys.stderr, flush=True)
            try:
                store = LocalObjectStore(Path(tempfile.mkdtemp(prefix="nbiafs-demo-s3-"))).start()
            except RuntimeError as exc:
                raise CliError(str(exc).splitlines()[0]) from None
            os.environ.update(store.environment())  # boto3 reads them; never in argv
            args.shared_cache = f"s3://{store.bucket}/demo"
        config = mount_config(args, root_url=archive.url, cache_dir=cache_dir)
        print(demo_instructions(archive, mountpoint, args.names), flush=True)
        if store is not None:
            print(f"The shared cache is {args.shared_cache} at {store.endpoint}: the status shows what came "
                  "from it and what was put into it.", flush=True)
        if mirror is not None:
            print(f"IDC's mirror (a local copy) is at {mirror.endpoint}: read a series, then see its files' "
                  "user.nbia.source (getfattr -d FILE) and the status view's idc: line.", flush=True)
        run(config)
    except MountError as exc:
        raise CliError(str(exc)) from None
    finally:
        archive.stop()
        for started in (store, mirror):
            if started is not None:
                started.stop()
                shutil.rmtree(started.directory, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
        removed = False
        if created:
            try:
                mountpoint.rmdir()
                removed = True
            except OSError:
                pass
    print(f"\nnbiafs demo: unmounted {mountpoint}{' (and removed it)' if removed else ''}, stopped the local "
          f"archive, deleted its cache {cache_dir}; the demo archive stays in {archive.index.files_root} for next time",
          file=sys.stderr)
    return 0


def _demo_mirror(archive):
    """A SeaweedFS holding the demo's public series as IDC's mirror lays them out (the last one
    left out: it comes from the archive), and their index; the S3 endpoint goes to boto3
    through the environment (never argv)."""
    import os
    import tempfile
    from pathlib import Path

    from nbiafs.archive.idcmirror import put_series, write_index
    from nbiafs.archive.objectstore import LocalObjectStore

    print("Starting a local copy of IDC's S3 mirror (SeaweedFS)...", file=sys.stderr, flush=True)
    try:
        store = LocalObjectStore(Path(tempfile.mkdtemp(prefix="nbiafs-demo-idc-")), bucket="idc-open-data-demo",
                                 anonymous_read=True).start()
    except RuntimeError as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    try:
        s3 = store.client()
        series = sorted(archive.index.iter_series("nbia_guest"), key=lambda s: s.uid)
        rows = [put_series(s3, store.bucket, s) for s in series[:-1]]
        index = write_index(rows, store.directory / "idc_index.parquet")
    except Exception:
        store.stop()
        raise
    os.environ["AWS_ENDPOINT_URL_S3"] = store.endpoint
    return store, str(index)


def demo_instructions(archive, mountpoint, names: str = "readable") -> str:
    from nbiafs import naming

    everything = list(archive.index.iter_series("nbia_guest"))
    series = max((s for s in everything if s.raw["Modality"] == "CT"), key=lambda s: len(s.instances))
    study_name, series_name = naming.escape(series.study["StudyInstanceUID"]), naming.escape(series.uid)
    if names == "readable":  # as the mount will name them: among their siblings
        patient = [s for s in everything if s.patient is series.patient]
        study_name = naming.readable_names({s.study["StudyInstanceUID"]: naming.study_label(s.study)
                                            for s in patient})[series.study["StudyInstanceUID"]]
        series_name = naming.readable_names({s.uid: naming.series_label(s.raw) for s in patient
                                             if s.study is series.study})[series.uid]
    rel = "/".join([naming.escape(series.collection["Collection"]), naming.escape(series.patient["PatientID"]),
                    study_name, series_name])
    d = f"{mountpoint}/{rel}"
    first = sorted(i.sop_uid for i in series.instances)[0]
    return f"""
nbiafs demo: the local archive {archive.url} is mounted at {mountpoint}

Try, in another terminal:
  ls -l {mountpoint}
  find {mountpoint} -maxdepth 3
  getfattr -d '{d}'
  dcmdump '{d}/{naming.instance_file_name(first)}' | head -40
  dcm2niix -w 1 -o /tmp '{d}'
  du -sb '{d}'
  cp '{d}/.preview.png' /tmp/preview.png   # the middle slice, for any image viewer
  nbiafs prefetch '{mountpoint}/{naming.escape(series.collection["Collection"])}'
  nbiafs status {mountpoint}

Press Ctrl-C here to unmount and stop.
"""


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
    p.add_argument("--versions", default="v1,v2,v4", metavar="LIST",
                   help="API versions served, e.g. v4 (only v4, as production may soon be); default: v1,v2,v4")
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
        versions = [v.strip() for v in args.versions.split(",") if v.strip()]
        LocalArchive._checked_versions(versions)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    faults = Faults(latency_s=args.latency_ms / 1000, slow_metadata_s=args.slow_metadata_ms / 1000,
                    connection_mbit_s=args.connection_mbit, total_mbit_s=args.total_mbit,
                    image_outage=args.image_outage, image_error_rate=args.image_error_rate,
                    stall=args.stall or "", truncate_images=args.truncate_images)
    tokens = TokenStore(users, access_lifetime_s=args.token_lifetime,
                        refresh_lifetime_s=args.refresh_lifetime)
    try:
        archive = LocalArchive(index, tokens, faults, host=args.host, port=args.port, versions=versions)
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


def setup_logging(level: str, log_file: str | None = None) -> None:
    try:
        target = {"filename": log_file} if log_file else {"stream": sys.stderr}
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            **target)
        # boto3's debug lines hold every request's headers (the access key's id, signatures) and
        # each a few kB: the tier logs what it does itself.
        for noisy in ("boto3", "botocore", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    except OSError as exc:
        raise CliError(f"--log-file {log_file}: {exc.strerror}") from None
    except ValueError:
        raise CliError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR") from None
    # The binding logs every errno it returns (ENOENT, ENODATA…) with a traceback at DEBUG:
    # those are answers, not faults; nbiafs logs what matters about them itself.
    logging.getLogger("fuse").setLevel(max(logging.INFO, logging.getLogger().level))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "mount":
        from pathlib import Path

        from nbiafs.settings import SettingsError, load_config_file, parse_mount_options

        try:  # flags win over -o options, which win over the config file
            settings = load_config_file(Path(args.config).expanduser() if args.config else None,
                                        required=bool(args.config))
            options = parse_mount_options(",".join(args.options or []))
            settings.update(options)
        except SettingsError as exc:
            print(f"nbiafs: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if settings:
            args = build_parser(settings).parse_args(argv)
        if args.verbose:
            args.log_level = "DEBUG"
    try:
        setup_logging(args.log_level, getattr(args, "log_file", None))
        return args.func(args) or 0
    except CliError as exc:
        print(f"nbiafs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def mount_helper(argv: list[str] | None = None) -> int:
    """The mount(8) helper: `mount -t fuse.nbiafs SOURCE DIR -o OPTS` (or an /etc/fstab line
    `SOURCE DIR fuse.nbiafs OPTS 0 0`) runs `mount.fuse.nbiafs SOURCE DIR -o OPTS`. SOURCE is
    the archive (`tcia`, `nlst` or a URL); the options are those of `nbiafs mount -o`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    positional, options = [], []
    items = iter(argv)
    for item in items:
        if item == "-o":
            options.append(next(items, ""))
        elif item.startswith("-o"):
            options.append(item[2:])
        elif item in ("-t", "-N"):
            next(items, None)  # the type and the namespace mount(8) passes along
        elif item.startswith("-"):
            continue  # -s (sloppy), -f (fake), -n (no mtab), -v (verbose)
        else:
            positional.append(item)
    if len(positional) != 2:
        print("usage: mount.fuse.nbiafs SOURCE MOUNTPOINT [-o OPTIONS]  (SOURCE: tcia, nlst or a URL)",
              file=sys.stderr)
        return EXIT_USAGE
    source, mountpoint = positional
    args = ["mount", mountpoint]
    if source not in ("nbiafs", "none"):
        args += ["--url", source]
    for text in options:
        args += ["-o", text]
    return main(args)
