"""`com4d-backend`: run the reconstruction service, make its keys, or check that it answers."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.listen import ListenConfig

EXAMPLES = """examples:
  com4d-backend serve --weights ~/models --store ~/com4d-jobs --device cuda
  com4d-backend keys ~/com4d-keys
  com4d-backend serve --weights ~/models --bind tcp://0.0.0.0:5555 --keys ~/com4d-keys \\
      --clients ~/com4d-keys/clients
  com4d-backend ping --connect tcp://127.0.0.1:5555
  com4d-backend serve --weights ~/models --ray auto           # every GPU of this machine (pip install com4d[cluster])
  com4d-backend serve --weights ~/models --ray head-node:6379  # every GPU of a Ray cluster (docs/deploy.md)
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'24GiB', '500MB', '1048576' -> bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 8GiB, 500MB, 1048576)")
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="com4d-backend",
        description="The COM4D reconstruction service (ZeroMQ + msgpack).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="load the weights once and serve jobs",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--weights", required=True, type=Path, help="folder with TripoSG/ and COM4D/")
    serve.add_argument("--sam", type=Path, default=None, help="SAM checkpoint (needed for video + prompts)")
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint for clients (%(default)s)")
    serve.add_argument("--store", type=Path, default=Path("com4d-jobs"), help="job store folder")
    serve.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default %(default)s)")
    serve.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="model dtype (default float16 on cuda, float32 on cpu)",
    )
    serve.add_argument("--keys", type=Path, default=None, help="folder with server.key_secret (CurveZMQ)")
    serve.add_argument("--clients", type=Path, default=None, help="folder of admitted client public keys")
    serve.add_argument(
        "--allow-any-client",
        action="store_true",
        help="with --keys: admit any client that knows the server's public key",
    )
    serve.add_argument(
        "--memory-budget",
        type=parse_size,
        default=None,
        help="refuse jobs estimated above this much memory, e.g. 20GiB",
    )
    serve.add_argument("--max-queue", type=int, default=16)
    serve.add_argument("--max-frames", type=int, default=1024)
    serve.add_argument("--max-objects", type=int, default=32)
    serve.add_argument("--max-video", type=parse_size, default=2 << 30, help="largest video upload")
    serve.add_argument(
        "--max-frame-pixels", type=int, default=4096 * 4096, help="largest frame, width x height (%(default)s)"
    )
    serve.add_argument(
        "--max-job-pixels", type=int, default=1 << 30, help="pixels of all images a job decodes (%(default)s)"
    )
    serve.add_argument(
        "--keep-days", type=float, default=30.0, help="delete finished jobs this many days old (%(default)s)"
    )
    serve.add_argument(
        "--max-store",
        type=parse_size,
        default=100 << 30,
        help="quota of the job store; the oldest finished jobs are deleted above it (default 100GiB)",
    )
    serve.add_argument(
        "--admins", type=Path, default=None, help="with --keys: folder of public keys that see and cancel every job"
    )
    ray = serve.add_argument_group("cluster mode (Ray; `pip install com4d[cluster]`, docs/deploy.md)")
    ray.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run jobs on Ray, one worker per GPU: `auto` (this machine's cluster, started if none) or HOST:PORT",
    )
    ray.add_argument("--ray-workers", type=int, default=None, help="workers to start (default: one per GPU)")
    ray.add_argument(
        "--ray-job-retries", type=int, default=1, help="runs more of a job whose worker died (default %(default)s)"
    )
    ray.add_argument(
        "--ray-files",
        choices=("auto", "stream", "shared"),
        default="auto",
        help="how workers on other machines get inputs and return files: auto (bytes unless on this machine), "
        "stream (bytes always), shared (the store is mounted at the same path on every node)",
    )
    ray.add_argument(
        "--ray-no-fan-out",
        action="store_true",
        help="keep each job's meshing on its own worker (default: idle workers mesh for running jobs)",
    )
    serve.add_argument("-v", "--verbose", action="store_true")

    keys = sub.add_parser(
        "keys",
        help="make CurveZMQ key pairs for a non-loopback server",
        epilog="examples:\n  com4d-backend keys ~/com4d-keys\n  com4d-backend keys ~/com4d-keys --client laptop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys.add_argument("folder", type=Path)
    keys.add_argument("--client", default="client", help="name of the client key pair to make")
    keys.add_argument("--force", action="store_true", help="replace existing keys")

    ping = sub.add_parser(
        "ping",
        help="ask a running backend who it is (prints its hello as JSON)",
        epilog="examples:\n  com4d-backend ping --connect tcp://127.0.0.1:5555\n  com4d-backend ping --connect "
        "tcp://gpu-box:5555 --server-key keys/server.key --client-key keys/clients/client.key_secret",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ping.add_argument("--connect", default="tcp://127.0.0.1:5555")
    ping.add_argument("--server-key", type=Path, default=None, help="the server's public key file")
    ping.add_argument("--client-key", type=Path, default=None, help="this client's .key_secret file")
    ping.add_argument("--timeout", type=float, default=5.0)
    return parser


def _listen_keys(args: argparse.Namespace, config: ListenConfig) -> None:
    """`--keys`, `--clients` and `--allow-any-client` into a ListenConfig, checked."""
    from backend.keys import count_client_keys, load_server_keys
    from backend.listen import SecurityError

    config.allow_any_client = args.allow_any_client
    if args.keys is not None:
        config.server_keys = load_server_keys(args.keys)
    if args.clients is not None:
        if count_client_keys(args.clients) == 0:
            raise SecurityError(f"{args.clients} holds no client public keys (*.key)")
        config.authorized_clients = args.clients.expanduser().resolve()


def _serve(args: argparse.Namespace) -> int:
    from backend.server import Server, ServerConfig, check_security
    from backend.store import JobStore

    config = ServerConfig(
        bind=args.bind,
        device=args.device,
        memory_budget=args.memory_budget,
        max_queue=args.max_queue,
        max_frames=args.max_frames,
        max_objects=args.max_objects,
        max_video_bytes=args.max_video,
        max_frame_pixels=args.max_frame_pixels,
        max_job_pixels=args.max_job_pixels,
        keep_days=args.keep_days,
        max_store_bytes=args.max_store,
    )
    _listen_keys(args, config)
    if args.admins is not None:
        from backend.keys import load_public_keys

        if config.server_keys is None:
            raise ValueError("--admins needs --keys: without keys every local client owns every job already")
        config.admin_keys = load_public_keys(args.admins)
    check_security(config)  # before minutes of weight loading
    from com4d.pipeline import COM4DPipeline

    dtype = args.dtype or ("float32" if args.device == "cpu" else "float16")
    store = JobStore(args.store)
    if args.ray is not None:
        from backend.cluster import ClusterConfig, ClusterWorker

        cluster = ClusterWorker(
            store,
            ClusterConfig(
                weights=str(args.weights),
                address=args.ray,
                device=args.device,
                dtype=dtype,
                sam_checkpoint=str(args.sam) if args.sam else None,
                workers=args.ray_workers,
                job_retries=args.ray_job_retries,
                files=args.ray_files,
                fan_out=not args.ray_no_fan_out,
            ),
            memory_budget=args.memory_budget,
        )
        log = logging.getLogger("com4d.backend")
        log.info("joining Ray (%s); its workers load %s (%s)", args.ray, args.weights, dtype)
        config.device = f"ray:{args.device}"  # this process holds no GPU; each worker's is in `model`
        cluster.connect()
        server = Server(cluster, store, config, worker=cluster.serving)
    else:
        logging.getLogger("com4d.backend").info("loading %s on %s (%s)", args.weights, args.device, dtype)
        pipeline = COM4DPipeline.from_pretrained(args.weights, device=args.device, dtype=dtype, sam_checkpoint=args.sam)
        server = Server(pipeline, store, config)
    server.bind()
    print(f"com4d-backend serving on {server.address}", flush=True)

    def stop(signum: int, frame: object) -> None:
        server.request_stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    return 0


def _keys(args: argparse.Namespace) -> int:
    from backend.keys import make_keys

    for path in make_keys(args.folder, client=args.client, force=args.force):
        print(path)
    print(
        f"Serve with: --keys {args.folder} --clients {args.folder / 'clients'}\n"
        f"Give clients {args.folder / 'server.key'} and their own clients/<name>.key_secret."
    )
    return 0


def _ping(args: argparse.Namespace) -> int:
    from backend.client import Client, read_key_pair, read_public_key

    server_key = read_public_key(args.server_key) if args.server_key else None
    client_keys = read_key_pair(args.client_key) if args.client_key else None
    with Client(args.connect, server_key, client_keys, timeout=args.timeout, name="com4d-backend ping") as c:
        print(json.dumps(c.hello(), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    commands = {"serve": _serve, "keys": _keys, "ping": _ping}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line that says what went wrong, no traceback
        name = getattr(exc, "code", None) or type(exc).__name__
        print(f"com4d-backend {args.command}: {name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
