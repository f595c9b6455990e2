"""`lithos-ray`: start/stop lithos on a node, show status, run the demo, plan placement, benchmark."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import LithosError, LithosRequestError


def _connect(address: str | None) -> None:
    import ray

    from .config import NAMESPACE
    from .errors import LithosNotRunning

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from .node import reachable_gcs

    gcs = reachable_gcs(address)
    if gcs is None:
        raise LithosNotRunning(f"lithos is not running here: no Ray cluster answers at {address or 'this node'}. "
                               f"Start it with `lithos-ray start --head` (add --simulate H100:2 without a GPU)")
    try:
        ray.init(address=gcs, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        raise LithosNotRunning(f"lithos is not running here: no Ray cluster at {address or 'this node'} ({exc}). "
                               f"Start it with `lithos-ray start --head` (add --simulate H100:2 without a GPU)") from None


def cmd_start(args) -> int:
    from .node import start_node

    state = start_node(args.head, args.address, args.simulate, args.port, args.ray_arg, args.acquire_timeout_s)
    total = sum(g["sms"] // 2 for g in state["gpus"])
    print(f"lithos started on node {state['node_id'][:12]}: lithos_tpc={total}")
    for agent in state["agents"]:
        tag = "SIMULATED" if agent["simulated"] else "real"
        print(f"  GPU {agent['index']} {agent['model']} [{tag}] {agent['tpcs']} TPCs, agent gRPC on "
              f"127.0.0.1:{agent['port']}")
    if state.get("dashboard_url"):
        print(f"lithos page: {state['dashboard_url']}")
    print("Use it: @ray.remote(resources={'lithos_tpc': 12}); see `lithos-ray status`.")
    return 0


def cmd_stop(args) -> int:
    from .node import stop_node

    result = stop_node()
    print(f"lithos stopped: {result['agents_stopped']} agent(s), {result['ray_processes_stopped']} Ray process(es) of "
          f"the node it started")
    return 0


def cmd_status(args) -> int:
    from .status import ClusterStatus, cluster_status, format_table

    if args.schema:
        print(json.dumps(ClusterStatus.model_json_schema(), indent=2))
        return 0
    _connect(args.address)
    status = cluster_status(with_dashboard_url=True)
    if not status.nodes:
        from .errors import LithosNotRunning
        raise LithosNotRunning("Ray is running but no lithos agent is registered; start lithos with `lithos-ray start`")
    print(status.model_dump_json(indent=2) if args.json else format_table(status))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(simulate=args.simulate, seconds=args.seconds)


def cmd_run(args) -> int:
    """Get a grant for this process, then exec the program: same pid, so the grant lives exactly as long."""
    import ray

    from . import client
    from .config import make_request
    from .node import NODE_STATE_FILE

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise LithosRequestError("lithos-ray run needs a program after --, e.g. lithos-ray run --tpc 12 -- python x.py")
    fields = dict(tpcs=args.tpc, priority=args.priority, slo_ms=args.slo_ms, gpu_index=args.gpu_index)
    if args.acquire_timeout_s is not None:
        fields["acquire_timeout_s"] = args.acquire_timeout_s
    request = make_request(**fields)
    _connect(None)
    node_id = ray.get_runtime_context().get_node_id()
    agents = client.list_agents(node_id)
    ray.shutdown()
    grant = client.acquire(request, agents, name=os.path.basename(command[0]))
    env = {**os.environ, **client.grant_env(grant)}
    if NODE_STATE_FILE.exists():
        env.update(json.loads(NODE_STATE_FILE.read_text()).get("mps_env") or {})
    print(f"lithos-ray run: {grant.tpcs} TPCs {list(grant.tpc_ids)} on GPU {grant.gpu_index} ({grant.gpu_uuid}"
          f"{', simulated' if grant.simulated else ''})", file=sys.stderr, flush=True)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        client.release(grant)
        raise LithosRequestError(f"cannot run {command[0]!r}: {exc.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lithos-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="start Ray with lithos on this node (one agent per GPU)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--head", action="store_true", help="start a new cluster with this node as head")
    mode.add_argument("--address", help="join the cluster whose head is at HOST:PORT")
    p.add_argument("--simulate", metavar="MODEL:COUNT", help="simulated GPUs instead of real ones, e.g. H100:2")
    p.add_argument("--port", type=int, help="GCS port of a new head node (Ray's default 6379)")
    p.add_argument("--acquire-timeout-s", type=float, help="how long a client waits for room on one GPU (default 120)")
    p.add_argument("--ray-arg", action="append", default=[], metavar="ARG", help="extra argument for `ray start`")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop what `lithos-ray start` started on this node, and nothing else")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="GPUs, grants and clients of every node")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema: --schema)")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of --json and exit")
    p.add_argument("--address", help="Ray cluster address (default: the one running on this node)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="run the demo on an embedded local Ray cluster")
    p.add_argument("--simulate", metavar="MODEL:COUNT", help="force simulated GPUs (default: real GPUs if any, else H100:1)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the demo's workloads run (default 10)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run an unmodified program as a lithos client of this node")
    p.add_argument("--tpc", type=int, required=True, help="TPCs of one GPU for the program")
    p.add_argument("--priority", default="best_effort", help="latency_critical or best_effort (default)")
    p.add_argument("--slo-ms", type=float, help="latency objective of one request")
    p.add_argument("--gpu-index", type=int, help="only this GPU of the node")
    p.add_argument("--acquire-timeout-s", type=float, help="how long to wait for room on one GPU (default 120)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    p.set_defaults(func=cmd_run)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    try:
        from .placement import cli as placement_cli
    except ImportError:
        return
    p = sub.add_parser("place", help="plan which models share which GPUs from their daily traffic profiles")
    placement_cli.configure_place_parser(p)
    p.set_defaults(func=placement_cli.run_place)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("place", help="placement quality and planning time at 100..10,000 models")
    placement_cli.configure_bench_parser(p)
    p.set_defaults(func=placement_cli.run_bench)
    p = bench.add_parser("colocate", help="services next to training under each sharing system (needs a GPU "
                                          "and a source checkout)")
    try:
        from . import bench_colocate
        bench_colocate.configure_parser(p)
        p.set_defaults(func=bench_colocate.run)
    except LithosError as exc:   # benchmarks/ lives in the source tree only
        p.set_defaults(func=lambda args, why=str(exc): _unavailable(why))


def _unavailable(why: str) -> int:
    raise LithosError(why)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except LithosError as exc:
        print(f"lithos-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
