"""Simulated evaluation: time to accuracy per strategy, and accuracy under Byzantine clients per rule.

Setup (all deterministic for a seed):

- Data: scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package, no
  download), 80/20 stratified split, the training part spread over clients with Dirichlet label
  skew (Hsu et al., 2019): a small `alpha` gives each client a few dominant classes.
- Model: multinomial logistic regression in numpy; clients run minibatch SGD for Q local steps.
- Speeds: seconds per local step spread log-uniformly between 1x and 39x. FLASH (Yang et al.,
  "Characterizing Impacts of Heterogeneity in Federated Learning upon Large-Scale Smartphone
  Data", WWW 2021) measured about this spread in training speed across 136k real phones. Every trip
  is multiplied by log-normal jitter so the FedCompass speed estimator has noise to absorb.
- Clock: an event queue of simulated seconds (communication and aggregation are free, which
  favours FedAvg, whose only cost is waiting for stragglers).

Strategies: synchronous FedAvg (every round waits for the slowest client), FedCompass (arrival
groups from `scheduler`, late updates with staleness weights), FedAsync (Xie et al., 2019: mix every
update in as it lands) and FedBuff (Nguyen et al., 2022: apply every K updates).

One server step for all asynchronous strategies (`server_rate`, eta): every update moves the model
by eta x its client's data share x its staleness weight x its delta, whenever the strategy applies
it (FedAsync: on arrival; FedBuff: every K; FedCompass: with its arrival group). That is APPFL's
scaling for all three (`alpha * staleness_fn(tau) * weight`, weight = 1/num_clients or the sample
share, in its FedAsync, FedBuff and FedCompass aggregators), and at eta = 1 one update weighs what
it weighs in a FedAvg round. The first version of this study gave FedBuff the mean of its K deltas
at rate 1, i.e. N/K = 4 times the step FedCompass got, and compared the two at unequal steps.

Byzantine study: a fraction of clients send their honest delta flipped and scaled (a sign-flip
attack), under synchronous FedAvg, once per aggregation rule.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from ampacity.federated import aggregation, scheduler
from ampacity.federated.aggregation import Rule
from ampacity.federated.speed import SpeedEstimate, observe

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FEATURES = 64
CLASSES = 10


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the experiment; the defaults are the configuration in docs/results/federated.md."""

    seed: int = 0
    clients: int = 20
    dirichlet_alpha: float = 0.5
    speed_spread: float = 39.0
    speed_jitter: float = 0.1
    q_min: int = 5
    q_max: int = 40
    batch_size: int = 16
    learning_rate: float = 0.05
    lateness: float = 1.2
    staleness_exponent: float = 0.5
    fedbuff_size: int = 5
    server_rate: float = 1.0
    target_accuracy: float = 0.93
    max_time_s: float = 100_000.0
    byzantine_fraction: float = 0.2
    attack_scale: float = 4.0
    byzantine_rounds: int = 40


@dataclass(frozen=True)
class FederatedData:
    """Per-client training shards and the shared test set."""

    client_x: tuple[FloatArray, ...]
    client_y: tuple[IntArray, ...]
    test_x: FloatArray
    test_y: IntArray

    @property
    def sizes(self) -> FloatArray:
        return np.array([len(y) for y in self.client_y], dtype=np.float64)


@dataclass(frozen=True)
class RunResult:
    """One simulated run: when it first reached the target, and its accuracy curve."""

    method: str
    time_to_target_s: float | None
    final_accuracy: float
    best_accuracy: float
    global_updates: int
    local_steps: int
    trace: tuple[tuple[float, float], ...] = field(repr=False)


def load_federated_digits(clients: int, alpha: float, seed: int) -> FederatedData:
    """Digits, split 80/20, the training part spread over `clients` with Dirichlet(alpha) label skew."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float64) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(clients)]
    for label in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y_train == label))
        share = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
        for client, part in enumerate(np.split(idx, cuts)):
            shards[client].extend(part.tolist())
    # Every client keeps at least one batch worth of data so that it can take a step.
    order = rng.permutation(len(y_train))
    for client, shard in enumerate(shards):
        if len(shard) < 8:
            shard.extend(order[client * 8 : client * 8 + 8 - len(shard)].tolist())
    return FederatedData(
        tuple(x_train[np.array(s)] for s in shards),
        tuple(y_train[np.array(s)] for s in shards),
        x_test,
        y_test,
    )


def client_speeds(clients: int, spread: float, rng: np.random.Generator) -> FloatArray:
    """Seconds per local step, log-uniform in [1, spread]; the extremes are always present."""
    if clients == 1:
        return np.ones(1)
    ladder = np.exp(np.linspace(0.0, np.log(spread), clients))
    return np.asarray(rng.permutation(ladder), dtype=np.float64)


def initial_model() -> FloatArray:
    """Flat parameters (weights then biases) of the logistic regression, all zero."""
    return np.zeros(FEATURES * CLASSES + CLASSES)


def model_params(theta: FloatArray) -> dict[str, FloatArray]:
    """The flat vector as the named arrays the aggregator stores (`flatten` sorts names: bias, weight)."""
    return {"bias": theta[:CLASSES].copy(), "weight": theta[CLASSES:].reshape(FEATURES, CLASSES).copy()}


def params_vector(params: Mapping[str, npt.NDArray[np.generic]]) -> FloatArray:
    """Inverse of `model_params`."""
    return aggregation.flatten(params)


def _logits(theta: FloatArray, x: FloatArray) -> FloatArray:
    result: FloatArray = x @ theta[CLASSES:].reshape(FEATURES, CLASSES) + theta[:CLASSES]
    return result


def accuracy(theta: FloatArray, x: FloatArray, y: IntArray) -> float:
    """Fraction of `x` classified as `y`."""
    return float(np.mean(np.argmax(_logits(theta, x), axis=1) == y))


def local_train(
    theta: FloatArray,
    x: FloatArray,
    y: IntArray,
    steps: int,
    batch_size: int,
    learning_rate: float,
    rng: np.random.Generator,
) -> FloatArray:
    """`steps` minibatch SGD steps of softmax cross-entropy from `theta`; returns the delta."""
    w = theta[CLASSES:].reshape(FEATURES, CLASSES).copy()
    b = theta[:CLASSES].copy()
    onehot = np.eye(CLASSES)[y]
    for _ in range(steps):
        batch = rng.integers(0, len(y), size=min(batch_size, len(y)))
        logits = x[batch] @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        err = (p - onehot[batch]) / len(batch)
        w -= learning_rate * (x[batch].T @ err)
        b -= learning_rate * err.sum(axis=0)
    delta: FloatArray = np.concatenate([b, w.ravel()]) - theta
    return delta


class _Recorder:
    """Accuracy after each global update, and the first time the target was reached."""

    def __init__(self, data: FederatedData, target: float) -> None:
        self.data = data
        self.target = target
        self.trace: list[tuple[float, float]] = []
        self.reached: float | None = None
        self.local_steps = 0

    def record(self, now_s: float, theta: FloatArray) -> None:
        acc = accuracy(theta, self.data.test_x, self.data.test_y)
        self.trace.append((now_s, acc))
        if self.reached is None and acc >= self.target:
            self.reached = now_s

    def result(self, method: str) -> RunResult:
        accs = [a for _, a in self.trace] or [0.0]
        return RunResult(
            method, self.reached, accs[-1], max(accs), len(self.trace), self.local_steps, tuple(self.trace)
        )


def _trip(cfg: SimConfig, speed: float, steps: int, rng: np.random.Generator) -> float:
    return steps * speed * float(rng.lognormal(0.0, cfg.speed_jitter))


def _rngs(cfg: SimConfig, stream: int) -> tuple[np.random.Generator, list[np.random.Generator]]:
    root = np.random.SeedSequence([cfg.seed, stream])
    children = root.spawn(cfg.clients + 1)
    return np.random.default_rng(children[0]), [np.random.default_rng(c) for c in children[1:]]


def run_fedavg(
    data: FederatedData,
    cfg: SimConfig,
    rule: Rule = Rule.MEAN,
    attackers: frozenset[int] = frozenset(),
    rounds: int | None = None,
) -> RunResult:
    """Synchronous FedAvg: all clients do Q_max steps; each round lasts as long as its slowest trip."""
    clock_rng, rngs = _rngs(cfg, 1)
    speeds = client_speeds(cfg.clients, cfg.speed_spread, clock_rng)
    theta = initial_model()
    rec = _Recorder(data, cfg.target_accuracy)
    now = 0.0
    done = 0
    while (rounds is None and now < cfg.max_time_s) or (rounds is not None and done < rounds):
        deltas = []
        for c in range(cfg.clients):
            delta = local_train(
                theta,
                data.client_x[c],
                data.client_y[c],
                cfg.q_max,
                cfg.batch_size,
                cfg.learning_rate,
                rngs[c],
            )
            deltas.append(-cfg.attack_scale * delta if c in attackers else delta)
        rec.local_steps += cfg.clients * cfg.q_max
        now += max(_trip(cfg, float(speeds[c]), cfg.q_max, clock_rng) for c in range(cfg.clients))
        step = aggregation.aggregate(rule, deltas, data.sizes.tolist(), len(attackers))
        theta = theta + cfg.server_rate * step
        done += 1
        rec.record(now, theta)
        if rounds is None and rec.reached is not None:
            break
    return rec.result(f"fedavg/{rule.value}")


@dataclass
class _Pending:
    """A client's trip in flight: the update it will deliver and the version it started from."""

    delta: FloatArray
    base_version: int
    group_id: int


def run_fedcompass(data: FederatedData, cfg: SimConfig) -> RunResult:
    """FedCompass with the pure scheduler: group arrivals, staleness-weighted late updates."""
    clock_rng, rngs = _rngs(cfg, 2)
    speeds = client_speeds(cfg.clients, cfg.speed_spread, clock_rng)
    bounds = scheduler.StepBounds(cfg.q_min, cfg.q_max)
    total = float(data.sizes.sum())
    theta = initial_model()
    version = 0
    rec = _Recorder(data, cfg.target_accuracy)
    ids = [str(c) for c in range(cfg.clients)]
    # Registration benchmark: one noisy measurement per client before the first round.
    estimates = {
        cid: SpeedEstimate(cid, _trip(cfg, float(speeds[c]), 1, clock_rng)) for c, cid in enumerate(ids)
    }
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, client or group)
    seq = 0
    pending: dict[int, _Pending] = {}
    arrived: dict[int, list[int]] = {}
    late: list[tuple[FloatArray, int, int]] = []  # (delta, base version, client)
    plan = scheduler.CompassPlan()

    def dispatch(assignment: scheduler.Assignment, now: float) -> None:
        nonlocal seq
        c = int(assignment.client_id)
        x, y = data.client_x[c], data.client_y[c]
        delta = local_train(theta, x, y, assignment.local_steps, cfg.batch_size, cfg.learning_rate, rngs[c])
        rec.local_steps += assignment.local_steps
        pending[c] = _Pending(delta, version, assignment.group_id)
        elapsed = _trip(cfg, float(speeds[c]), assignment.local_steps, clock_rng)
        heapq.heappush(events, (now + elapsed, seq, "arrive", c))
        seq += 1
        estimates[assignment.client_id] = observe(
            estimates[assignment.client_id], assignment.client_id, elapsed, assignment.local_steps
        )

    def schedule_deadline(group: scheduler.Group) -> None:
        nonlocal seq
        heapq.heappush(events, (group.latest_arrival_s, seq, "deadline", group.group_id))
        seq += 1

    def place(client: int, now: float) -> None:
        nonlocal plan
        known = {g.group_id for g in plan.groups}
        assignment, plan = scheduler.assign_client(
            plan, str(client), estimates[str(client)].seconds_per_step, now, bounds, cfg.lateness
        )
        if assignment.group_id not in known:
            schedule_deadline(plan.group(assignment.group_id))
        dispatch(assignment, now)

    def aggregate_group(group_id: int, now: float) -> None:
        nonlocal theta, version, plan, late
        members = arrived.pop(group_id, [])
        contributions = [(pending[c].delta, pending[c].base_version, c) for c in members] + late
        if contributions:
            # FedCompass weighs each update by its client's share of all data times the staleness
            # weight, so a group moves the model in proportion to the data it represents.
            step = sum(
                cfg.server_rate
                * (float(data.sizes[c]) / total)
                * scheduler.staleness_weight(version - base, cfg.staleness_exponent)
                * delta
                for delta, base, c in contributions
            )
            theta = theta + step
            version += 1
            rec.record(now, theta)
        late = []
        plan = scheduler.close_group(plan, group_id)
        for c in members:
            del pending[c]
            place(c, now)

    assignments, plan = scheduler.initial_assignments(
        {cid: estimates[cid].seconds_per_step for cid in ids}, 0.0, bounds, cfg.lateness
    )
    for g in plan.groups:
        schedule_deadline(g)
    for a in assignments:
        dispatch(a, 0.0)
    while events and rec.reached is None:
        now, _, kind, ref = heapq.heappop(events)
        if now > cfg.max_time_s:
            break
        open_ids = {g.group_id for g in plan.groups}
        if kind == "deadline":
            if ref in open_ids:
                aggregate_group(ref, now)
            continue
        trip = pending[ref]
        if trip.group_id in open_ids:
            arrived.setdefault(trip.group_id, []).append(ref)
            if scheduler.group_ready(
                plan.group(trip.group_id), [str(c) for c in arrived[trip.group_id]], now
            ):
                aggregate_group(trip.group_id, now)
        else:
            # Missed its group: buffered into the next aggregation, and the client goes again now.
            late.append((trip.delta, trip.base_version, ref))
            del pending[ref]
            place(ref, now)
    return rec.result("fedcompass")


def run_async(data: FederatedData, cfg: SimConfig, buffer_size: int) -> RunResult:
    """FedAsync (`buffer_size == 1`) or FedBuff: clients loop on Q_max steps, no waiting.

    FedAsync mixes each arriving model in as x <- (1 - a) x + a x_client with a = eta x share x s;
    FedBuff adds the sum of every `buffer_size` updates, each eta x share x s x delta.
    """
    total = float(data.sizes.sum())
    clock_rng, rngs = _rngs(cfg, 3)
    speeds = client_speeds(cfg.clients, cfg.speed_spread, clock_rng)
    theta = initial_model()
    version = 0
    rec = _Recorder(data, cfg.target_accuracy)
    events: list[tuple[float, int]] = []
    trips: dict[int, tuple[FloatArray, FloatArray, int]] = {}
    buffer: list[FloatArray] = []

    def dispatch(c: int, now: float) -> None:
        delta = local_train(
            theta, data.client_x[c], data.client_y[c], cfg.q_max, cfg.batch_size, cfg.learning_rate, rngs[c]
        )
        rec.local_steps += cfg.q_max
        trips[c] = (theta, delta, version)
        heapq.heappush(events, (now + _trip(cfg, float(speeds[c]), cfg.q_max, clock_rng), c))

    for c in range(cfg.clients):
        dispatch(c, 0.0)
    while events and rec.reached is None:
        now, c = heapq.heappop(events)
        if now > cfg.max_time_s:
            break
        base_theta, delta, base = trips.pop(c)
        weight = (
            cfg.server_rate
            * (float(data.sizes[c]) / total)
            * scheduler.staleness_weight(version - base, cfg.staleness_exponent)
        )
        if buffer_size == 1:
            mix = min(1.0, weight)
            theta = (1.0 - mix) * theta + mix * (base_theta + delta)
            version += 1
            rec.record(now, theta)
        else:
            buffer.append(weight * delta)
            if len(buffer) == buffer_size:
                theta = theta + np.sum(buffer, axis=0)
                buffer = []
                version += 1
                rec.record(now, theta)
        dispatch(c, now)
    return rec.result("fedasync" if buffer_size == 1 else f"fedbuff(K={buffer_size})")


def compare_strategies(cfg: SimConfig) -> list[RunResult]:
    """Time to `cfg.target_accuracy` for FedAvg, FedCompass, FedAsync and FedBuff on one split."""
    data = load_federated_digits(cfg.clients, cfg.dirichlet_alpha, cfg.seed)
    return [
        run_fedavg(data, cfg),
        run_fedcompass(data, cfg),
        run_async(data, cfg, 1),
        run_async(data, cfg, cfg.fedbuff_size),
    ]


def attacker_set(cfg: SimConfig) -> frozenset[int]:
    """Which clients are Byzantine: a seeded sample of `byzantine_fraction` of them."""
    count = round(cfg.byzantine_fraction * cfg.clients)
    rng = np.random.default_rng([cfg.seed, 4])
    return frozenset(int(c) for c in rng.choice(cfg.clients, size=count, replace=False))


def byzantine_study(cfg: SimConfig) -> list[tuple[Rule, float, float]]:
    """(rule, clean accuracy, accuracy with attackers) after `byzantine_rounds` FedAvg rounds."""
    data = load_federated_digits(cfg.clients, cfg.dirichlet_alpha, cfg.seed)
    bad = attacker_set(cfg)
    rows = []
    for rule in Rule:
        clean = run_fedavg(data, cfg, rule, frozenset(), cfg.byzantine_rounds)
        attacked = run_fedavg(data, cfg, rule, bad, cfg.byzantine_rounds)
        rows.append((rule, clean.final_accuracy, attacked.final_accuracy))
    return rows


def report(cfg: SimConfig) -> str:
    """Both studies as Markdown tables (what `ampacity federated sim` prints)."""
    lines = [
        f"Target accuracy {cfg.target_accuracy:.0%}, {cfg.clients} clients, Dirichlet alpha "
        f"{cfg.dirichlet_alpha}, speed spread {cfg.speed_spread:g}x, Q in [{cfg.q_min}, {cfg.q_max}], "
        f"seed {cfg.seed}",
        "",
        "| method | time to target (sim s) | speedup vs fedavg | global updates | local steps | best acc |",
        "|---|---|---|---|---|---|",
    ]
    runs = compare_strategies(cfg)
    base = runs[0].time_to_target_s
    for r in runs:
        t = "not reached" if r.time_to_target_s is None else f"{r.time_to_target_s:,.0f}"
        speedup = (
            f"{base / r.time_to_target_s:.2f}x"
            if base is not None and r.time_to_target_s is not None
            else "-"
        )
        lines.append(
            f"| {r.method} | {t} | {speedup} | {r.global_updates} | {r.local_steps:,} "
            f"| {r.best_accuracy:.3f} |"
        )
    lines += [
        "",
        f"Byzantine: {len(attacker_set(cfg))} of {cfg.clients} clients send -{cfg.attack_scale:g}x their "
        f"update; synchronous rounds: {cfg.byzantine_rounds}",
        "",
        "| rule | clean acc | attacked acc | accuracy loss vs clean mean (points) |",
        "|---|---|---|---|",
    ]
    study = byzantine_study(cfg)
    clean_mean = study[0][1]
    for rule, clean, attacked in study:
        lines.append(f"| {rule.value} | {clean:.3f} | {attacked:.3f} | {100 * (clean_mean - attacked):.1f} |")
    return "\n".join(lines)


#: The server rates `ampacity federated compare` sweeps by default: FedAvg's scale (1), and 4 =
#: N/K, the step the first version of this study gave FedBuff alone.
COMPARE_RATES = (1.0, 2.0, 4.0)
COMPARED = ("fedavg", "fedbuff", "fedcompass")


def compare_at_rates(
    cfg: SimConfig, seeds: tuple[int, ...], rates: tuple[float, ...] = COMPARE_RATES
) -> dict[tuple[int, float], dict[str, float | None]]:
    """Time to target per (seed, server rate): FedAvg at rate 1 and at the rate, FedBuff, FedCompass."""
    out: dict[tuple[int, float], dict[str, float | None]] = {}
    for seed in seeds:
        data = load_federated_digits(cfg.clients, cfg.dirichlet_alpha, seed)
        fedavg = run_fedavg(data, replace(cfg, seed=seed, server_rate=1.0)).time_to_target_s
        for rate in rates:
            at = replace(cfg, seed=seed, server_rate=rate)
            out[(seed, rate)] = {
                "fedavg": fedavg,
                "fedavg_at_rate": fedavg if rate == 1.0 else run_fedavg(data, at).time_to_target_s,
                "fedbuff": run_async(data, at, cfg.fedbuff_size).time_to_target_s,
                "fedcompass": run_fedcompass(data, at).time_to_target_s,
            }
            print(f"seed {seed} rate {rate:g}: {out[(seed, rate)]}", file=sys.stderr, flush=True)
    return out


def compare_report(cfg: SimConfig, seeds: tuple[int, ...], rates: tuple[float, ...] = COMPARE_RATES) -> str:
    """The comparison as Markdown: one table per server rate, medians and speedups below each."""
    results = compare_at_rates(cfg, seeds, rates)

    def fmt(t: float | None) -> str:
        return "not reached" if t is None else f"{t:,.0f}"

    lines = [
        f"Time to {cfg.target_accuracy:.0%} test accuracy (simulated s), {cfg.clients} clients,"
        f" Dirichlet {cfg.dirichlet_alpha}, speed spread {cfg.speed_spread:g}x, Q in [{cfg.q_min},"
        f" {cfg.q_max}], FedBuff K={cfg.fedbuff_size}, staleness (1+tau)^-{cfg.staleness_exponent:g}",
    ]
    for rate in rates:
        lines += [
            "",
            f"Server rate {rate:g} (every async update moves the model by {rate:g} x data share x"
            " staleness weight x delta):",
            "",
            f"| seed | fedavg (rate 1) | fedavg (rate {rate:g}) | fedbuff | fedcompass"
            " | fedcompass / fedbuff time | speedup vs fedavg (rate 1) | speedup vs fedavg (same rate) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ratios: dict[str, list[float]] = {"buff": [], "avg": [], "avg_same": []}
        for seed in seeds:
            r = results[(seed, rate)]
            avg, avg_same, buff, compass = r["fedavg"], r["fedavg_at_rate"], r["fedbuff"], r["fedcompass"]
            cells = []
            for key, num, den in (
                ("buff", compass, buff),
                ("avg", avg, compass),
                ("avg_same", avg_same, compass),
            ):
                value = num / den if num and den else None
                if value is not None:
                    ratios[key].append(value)
                cells.append("-" if value is None else f"{value:.2f}")
            times = " | ".join(fmt(t) for t in (avg, avg_same, buff, compass))
            lines.append(f"| {seed} | {times} | {' | '.join(cells)} |")
        if all(ratios.values()):
            lines += [
                "",
                f"Medians: fedcompass/fedbuff time {float(np.median(ratios['buff'])):.2f} (below 1:"
                f" fedcompass first, on {sum(x < 1 for x in ratios['buff'])} of {len(ratios['buff'])}"
                " seeds); speedup"
                f" over fedavg at rate 1 {float(np.median(ratios['avg'])):.2f}x, over fedavg at the same rate"
                f" {float(np.median(ratios['avg_same'])):.2f}x.",
            ]
    return "\n".join(lines)
