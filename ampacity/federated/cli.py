"""`ampacity federated ...`: the simulated evaluation, the aggregator service and a demo client."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from ampacity.federated import tls
from ampacity.federated.aggregator import AggregatorConfig, Arrays, atomic_write, encode_arrays, run
from ampacity.federated.client import FederatedClient, TrainFn, TrainResult, enrol
from ampacity.federated.eval import evaluation
from ampacity.federated.wire import Task

ADMIN_TOKEN_ENV = "AMPACITY_FL_ADMIN_TOKEN"
ENROLMENT_TOKEN_ENV = "AMPACITY_FL_ENROLMENT_TOKEN"
PARENT_TOKEN_ENV = "AMPACITY_FL_PARENT_TOKEN"
CLIENT_TOKEN_ENV = "AMPACITY_FL_CLIENT_TOKEN"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `federated` command group."""
    group = subparsers.add_parser("federated", help="federated learning: simulation, aggregator, client")
    sub = group.add_subparsers(dest="federated_command", required=True, metavar="SUBCOMMAND")

    sim = sub.add_parser("sim", help="time to accuracy per strategy and accuracy under Byzantine clients")
    defaults = evaluation.SimConfig()
    sim.add_argument("--seed", type=int, default=defaults.seed)
    sim.add_argument("--clients", type=int, default=defaults.clients)
    sim.add_argument("--target", type=float, default=defaults.target_accuracy, help="target test accuracy")
    sim.add_argument("--alpha", type=float, default=defaults.dirichlet_alpha, help="Dirichlet label skew")
    sim.add_argument("--byzantine-rounds", type=int, default=defaults.byzantine_rounds)
    sim.set_defaults(func=_sim)

    compare = sub.add_parser(
        "compare", help="fedavg, fedbuff and fedcompass to the same accuracy, same seeds, same server step"
    )
    compare.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    compare.add_argument(
        "--server-rates",
        default=",".join(f"{r:g}" for r in evaluation.COMPARE_RATES),
        help="comma-separated server rates (one table each)",
    )
    compare.add_argument("--target", type=float, default=defaults.target_accuracy)
    compare.set_defaults(func=_compare)

    agg = sub.add_parser("aggregator", help="run the aggregator service")
    agg.add_argument("--host", default="0.0.0.0")
    agg.add_argument("--port", type=int, default=8470)
    agg.add_argument("--state-dir", type=Path, required=True, help="where updates and models are persisted")
    agg.add_argument("--initial-model", type=Path, help=".npz that seeds an empty state directory")
    agg.add_argument("--max-update-bytes", type=int, default=64 * 1024 * 1024)
    agg.add_argument("--tls-cert", type=Path, help="PEM certificate to serve HTTPS with (with --tls-key)")
    agg.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    agg.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP (only for a federation that asked for it explicitly)",
    )
    agg.add_argument("--parent-url", help="run as an intermediate (LIFL) aggregator under this parent")
    agg.add_argument("--parent-ca", type=Path, help="CA certificate that verifies the parent aggregator")
    agg.add_argument("--deadline-poll-seconds", type=float, default=0.2)
    agg.set_defaults(func=_aggregator)

    init = sub.add_parser("init-model", help="write the demo digits model (all zeros) as .npz")
    init.add_argument("--out", type=Path, required=True)
    init.set_defaults(func=_init_model)

    client = sub.add_parser("client", help="demo client: logistic regression on a shard of the digits data")
    _connection_args(client)
    client.add_argument("--shard", type=int, required=True, help="this client's shard index")
    client.add_argument("--shards", type=int, required=True, help="number of shards (clients)")
    client.add_argument("--seed", type=int, default=0)
    client.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    client.add_argument("--batch-size", type=int, default=defaults.batch_size)
    client.add_argument(
        "--step-delay-seconds", type=float, default=0.0, help="sleep per step (a slow device)"
    )
    client.add_argument(
        "--seconds-per-step",
        type=float,
        help="speed to register with (FedCompass's initial estimate); default: one timed local step",
    )
    client.set_defaults(func=_client)

    flower = sub.add_parser(
        "flower-client", help="run a Flower NumPyClient unchanged under Ampacity's client"
    )
    _connection_args(flower)
    flower.add_argument(
        "--client",
        required=True,
        metavar="FILE.py:FACTORY",
        help="what builds the Flower client (NumPyClient or Client): examples/flower_digits.py:make_client",
    )
    flower.add_argument(
        "--client-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for the factory"
    )
    flower.add_argument("--seconds-per-step", type=float, help="speed to register with")
    flower.set_defaults(func=_flower_client)


def _connection_args(parser: argparse.ArgumentParser) -> None:
    """What every client command needs to enrol and to reach its aggregator."""
    parser.add_argument("--url", required=True, help="aggregator URL")
    parser.add_argument("--ca-file", type=Path, help="CA certificate that verifies the aggregator (https)")
    parser.add_argument(
        "--server-name", help="the name on the aggregator's certificate, when --url's host is another"
    )
    parser.add_argument(
        "--credential-file",
        type=Path,
        help="where this client keeps its own token; enrolling again with it keeps the identity",
    )
    parser.add_argument("--client-id", required=True)
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label to register with (repeatable)",
    )
    parser.add_argument("--tasks", type=int, default=1, help="exit after uploading this many updates")
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    parser.add_argument("--timeout-seconds", type=float, default=300.0, help="give up waiting for tasks")


def _sim(args: argparse.Namespace) -> int:
    cfg = dataclasses.replace(
        evaluation.SimConfig(),
        seed=args.seed,
        clients=args.clients,
        target_accuracy=args.target,
        dirichlet_alpha=args.alpha,
        byzantine_rounds=args.byzantine_rounds,
    )
    print(evaluation.report(cfg))
    return 0


def _compare(args: argparse.Namespace) -> int:
    try:
        seeds = tuple(int(x) for x in args.seeds.split(","))
        rates = tuple(float(x) for x in args.server_rates.split(","))
    except ValueError as error:
        raise SystemExit(f"--seeds and --server-rates are comma-separated numbers: {error}") from error
    cfg = dataclasses.replace(evaluation.SimConfig(), target_accuracy=args.target)
    print(evaluation.compare_report(cfg, seeds, rates))
    return 0


def _token(env: str, what: str) -> str:
    token = os.environ.get(env, "")
    if not token:
        raise SystemExit(f"set {env} to the {what}")
    return token


def _aggregator(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.tls_cert is None and not args.insecure_http:
        raise SystemExit("give --tls-cert and --tls-key, or --insecure-http to serve plain HTTP on purpose")
    context = None if args.tls_cert is None else tls.server_context(args.tls_cert, args.tls_key)
    config = AggregatorConfig(
        state_dir=args.state_dir,
        admin_token=_token(ADMIN_TOKEN_ENV, "admin token"),
        enrolment_token=os.environ.get(ENROLMENT_TOKEN_ENV) or None,
        parent_ca=args.parent_ca,
        max_update_bytes=args.max_update_bytes,
        parent_url=args.parent_url,
        parent_token=_token(PARENT_TOKEN_ENV, "token this intermediate uses at its parent")
        if args.parent_url
        else None,
        deadline_poll_s=args.deadline_poll_seconds,
    )
    run(config, args.host, args.port, args.initial_model, context)
    return 0


def _init_model(args: argparse.Namespace) -> int:
    atomic_write(args.out, encode_arrays(evaluation.model_params(evaluation.initial_model())))
    print(args.out)
    return 0


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label wants KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def _client(args: argparse.Namespace) -> int:
    # Load the data first: a client registers only once it is ready to train.
    data = evaluation.load_federated_digits(args.shards, 0.5, args.seed)
    x, y = data.client_x[args.shard], data.client_y[args.shard]
    speed = args.seconds_per_step
    if speed is None:
        # One timed step (on its own generator, so training stays reproducible) plus the simulated delay.
        started = time.perf_counter()
        evaluation.local_train(
            evaluation.initial_model(), x, y, 1, args.batch_size, args.learning_rate, np.random.default_rng(0)
        )
        speed = time.perf_counter() - started + args.step_delay_seconds
    token = _enrol(args, speed)
    rng = np.random.default_rng([args.seed, args.shard])

    def train(params: Arrays, task: Task) -> TrainResult:
        theta = evaluation.params_vector(params)
        delta = evaluation.local_train(
            theta, x, y, task.local_steps, args.batch_size, args.learning_rate, rng
        )
        time.sleep(args.step_delay_seconds * task.local_steps)
        trained = theta + delta
        # The held-out accuracy, reported in the round's status (cheap: 360 digits).
        accuracy = evaluation.accuracy(trained, data.test_x, data.test_y)
        return TrainResult(evaluation.model_params(trained), len(y), accuracy)

    return _serve(args, token, train)


def _enrol(args: argparse.Namespace, seconds_per_step: float | None) -> str:
    # Tokens come from the environment, not argv, so they do not show up in `ps`.
    # Enrolling is idempotent: with the same credential file a restarted client keeps its identity.
    return enrol(
        args.url,
        _token(ENROLMENT_TOKEN_ENV, "population's enrolment token (the round's enrolment Secret)"),
        args.client_id,
        labels=_labels(args.label),
        seconds_per_step=None if seconds_per_step is None else max(seconds_per_step, 1e-6),
        ca_file=args.ca_file,
        server_name=args.server_name,
        credential_file=args.credential_file,
        token=os.environ.get(CLIENT_TOKEN_ENV) or None,
    )


def _serve(args: argparse.Namespace, token: str, train: TrainFn) -> int:
    """Poll for tasks, train and upload until `--tasks` uploads or `--timeout-seconds`."""
    uploaded = 0
    give_up = time.monotonic() + args.timeout_seconds
    with FederatedClient(args.url, token, ca_file=args.ca_file, server_name=args.server_name) as client:
        while uploaded < args.tasks and time.monotonic() < give_up:
            try:
                result = client.run_once(train)
            except httpx.TransportError as error:
                # The aggregator restarts (a rescheduled pod): it kept what it acknowledged, so the
                # next task says whether this update still has to be sent.
                print(f"{args.client_id}: aggregator unreachable ({error}); retrying", flush=True)
                time.sleep(args.poll_seconds)
                continue
            if result is None:
                time.sleep(args.poll_seconds)
                continue
            print(f"{args.client_id}: {result.status_code} {result.body}", flush=True)
            uploaded += 1
    if uploaded < args.tasks:
        print(
            f"{args.client_id}: gave up after {args.timeout_seconds:g}s with {uploaded} uploads",
            file=sys.stderr,
        )
        return 1
    return 0


def _flower_client(args: argparse.Namespace) -> int:
    # flwr is imported only here: the other commands do not need it installed.
    from ampacity.federated.flower import flower_train, load_factory

    try:
        factory = load_factory(args.client)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    flower = factory(**_labels(args.client_arg))
    return _serve(args, _enrol(args, args.seconds_per_step), flower_train(flower))
