"""A whole federation in one process (or a pool of worker processes).

Wires the device side (trainer/) and the aggregator (server/) together through
the real wire codec: every model sent down and every update sent up is encoded
to bytes, counted, and decoded on the other side, exactly as over MQTT.

Round r: the strategy samples clients; the global model is encoded once (downlink
bytes = its size times the clients of the round); each client decodes it, trains
one round (trainer/local_round.py, the method's own steps in trainer/methods/) and encodes its update; the server decodes the
updates, runs FedAvg weighted by sample counts and evaluates the result as is and
pruned globally to the method's sparsity (``accuracy_pruned``). As in the reference
(SparsyFed), the server does not prune the aggregate: each client prunes its own
model to the full target after every local round. ``server_prune`` (ours, not the
reference's) re-prunes the aggregate every round, which compounds the client
masks. ``layer_floor`` K (beyond the reference, against layer collapse) makes every
pruning keep at least min(K, size) weights per conv/linear layer. The learning rate
decays exponentially over the run: lr_r = lr0 * (lr_end / lr0) ** (r / (R - 1)).

``state()`` / ``restore()`` carry what a resumed run needs (the global tensors,
the screening reference); the client sampling, the clients' seeds and their data
order depend only on (seed, round, client), so nothing else needs saving.

Poisoned federations, for measuring robust aggregation: ``attackers`` = K makes
clients 0 .. K-1 send a poisoned model instead of their trained one
(``poison``): ``scale`` sends ``global + s * delta`` (s = 1e3 unless
``attack_scale``), ``signflip`` ``global - s * delta`` (s = 1), ``big`` the model
times s (1e30). It is an experiment knob of the simulation only (``serve`` has
none), recorded in the start event's config.

The round itself is server/round_loop.py's (the same loop ``serve`` runs over
MQTT); this module is its in-process transport (``InProcess``): every sampled
client is available, answers, and its reply crosses the codec. With
``workers > 1`` the clients of a round train in spawned processes (one Numba
thread each), which receive the encoded global model and return encoded updates;
spawn rather than fork because Numba's thread pool does not survive a fork.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.runtime.wire import codec
from sparsefedpp.runtime.wire.checks import tensors_problem
from sparsefedpp.runtime.wire.protocol import client_seed
from sparsefedpp.server import fedavg, robust
from sparsefedpp.server.fedavg import FedAvg
from sparsefedpp.server.round_loop import (
    Arrivals,
    RoundLoop,
    RoundPolicy,
    RoundRecord,
    Transport,
)
from sparsefedpp.server.strategy import ClientInstruction, ClientResult
from sparsefedpp.trainer import partition
from sparsefedpp.trainer.data import Dataset, load_dataset
from sparsefedpp.trainer.local import evaluate
from sparsefedpp.trainer.local_round import LocalConfig, local_round
from sparsefedpp.trainer.methods import MethodConfig, default_alpha, default_sparsity

EVAL_SPARSITIES = (0.9, 0.95, 0.99, 0.995, 0.999)
ATTACKS = {"none": None, "scale": 1e3, "signflip": 1.0, "big": 1e30}  # default s


@dataclass(frozen=True)
class SimConfig:
    """Everything a simulation run depends on (written to the metrics' start event)."""

    method: str = "sparsefedpp"
    sparsity: float | None = None       # None: 0.9, or 0 for fedavg
    model: str = "resnet8"
    width: float = 1.0
    alpha: float | None = None          # None: the method's default
    data: str = "fashion-mnist"
    clients: int = 100
    per_round: int = 10
    rounds: int = 20
    lda_alpha: float | None = 1.0       # None: IID
    val_share: float = 0.0
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.5
    lr_end: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 1e-3
    augment: bool = False
    mask_ratio: float = 0.0
    min_keep: float = 0.05
    encoding: str = "csr"
    server_prune: bool = False          # ours: re-prune the aggregate every round
    layer_floor: int = 0                # beyond the reference: weights per layer kept
    min_clients: int = 1
    eval_every: int = 1
    eval_sparsities: tuple = EVAL_SPARSITIES
    train_limit: int | None = None
    test_limit: int | None = None
    workers: int = 1
    aggregator: str = "fedavg"          # or clip, trimmed-mean, median
    trim: float = 0.1                   # trimmed-mean: share cut at each end
    screen_median: float = fedavg.SCREEN_MEDIAN  # 0: that bound off
    screen_global: float = fedavg.SCREEN_GLOBAL
    max_examples: int = fedavg.MAX_EXAMPLES
    attack: str = "none"                # simulation only: scale, signflip, big
    attackers: int = 0
    attack_scale: float | None = None   # None: the attack's default
    seed: int = 0

    def __post_init__(self):
        if self.sparsity is None:  # frozen: resolve the default in place
            object.__setattr__(self, "sparsity", default_sparsity(self.method))
        MethodConfig(self.method, self.sparsity, self.mask_ratio, self.min_keep,
                     layer_floor=self.layer_floor)
        checks = (("clients", self.clients, 1), ("per_round", self.per_round, 1),
                  ("rounds", self.rounds, 1), ("epochs", self.epochs, 1),
                  ("batch_size", self.batch_size, 1), ("eval_every", self.eval_every, 1),
                  ("workers", self.workers, 1), ("min_clients", self.min_clients, 1),
                  ("max_examples", self.max_examples, 1),
                  ("layer_floor", self.layer_floor, 0))
        for name, value, low in checks:
            if int(value) != value or value < low:
                raise ConfigError(f"simulate {name}: expected an integer >= {low}, got "
                                  f"{value!r}")
        if not (self.lr > 0 and self.lr_end > 0):
            raise ConfigError(f"simulate lr: expected lr > 0 and lr_end > 0, got "
                              f"{self.lr} and {self.lr_end}")
        if self.encoding not in codec.ENCODINGS:
            raise ConfigError(f"simulate encoding: expected one of "
                              f"{', '.join(codec.ENCODINGS)}, got {self.encoding!r}")
        robust.check_aggregator(self.aggregator, self.trim)
        if self.attack not in ATTACKS:
            raise ConfigError(f"simulate attack: expected one of {', '.join(ATTACKS)}, "
                              f"got {self.attack!r}")
        if (isinstance(self.attackers, bool) or int(self.attackers) != self.attackers
                or not 0 <= self.attackers <= self.clients):
            raise ConfigError(f"simulate attackers: expected an integer in 0 .. "
                              f"clients={self.clients}, got {self.attackers!r}")
        if (self.attackers > 0) != (self.attack != "none"):
            raise ConfigError(f"simulate attack: expected attackers > 0 with an attack "
                              f"and 0 without, got attack {self.attack!r} and "
                              f"{self.attackers} attackers")
        if not isinstance(self.server_prune, bool):
            raise ConfigError(f"simulate server_prune: expected true or false, got "
                              f"{self.server_prune!r}")
        if self.attack_scale is not None and not 0 < self.attack_scale < math.inf:
            raise ConfigError(f"simulate attack_scale: expected a finite number > 0, "
                              f"got {self.attack_scale!r}")

    @property
    def method_config(self) -> MethodConfig:
        return MethodConfig(self.method, self.sparsity, self.mask_ratio, self.min_keep,
                            layer_floor=self.layer_floor)

    @property
    def local_config(self) -> LocalConfig:
        return LocalConfig(self.epochs, self.batch_size, self.momentum,
                           self.weight_decay, self.augment)

    @property
    def model_alpha(self) -> float:
        return default_alpha(self.method) if self.alpha is None else self.alpha

    @property
    def attack_factor(self) -> float | None:
        """The attackers' s (see the module docstring), None without attack."""
        if self.attack == "none":
            return None
        return ATTACKS[self.attack] if self.attack_scale is None else self.attack_scale

    def lr_at(self, rnd: int) -> float:
        """Exponential decay from lr to lr_end over the run (rounds 0 .. R-1)."""
        if self.rounds == 1:
            return self.lr
        return self.lr * (self.lr_end / self.lr) ** (rnd / (self.rounds - 1))


# ---- the client side, in this process or in a worker process ------------------

_WORKER: dict = {}


def _init_client_side(config: SimConfig, train: Dataset, parts: list[np.ndarray]):
    """Build the client-side model once per process (weights come from the wire)."""
    _WORKER.update(config=config, train=train, parts=parts,
                   model=models.build(config.model, num_classes=len(train.classes),
                                      width=config.width, alpha=config.model_alpha,
                                      in_channels=train.images.shape[1],
                                      seed=config.seed))


def _init_worker(config: SimConfig, train: Dataset, parts: list[np.ndarray]):
    import numba

    numba.set_num_threads(1)
    _init_client_side(config, train, parts)


def client_task(client: int, rnd: int, lr: float, model_bytes: bytes) -> bytes:
    """Decode the global model, train one round, return the encoded update."""
    config, model = _WORKER["config"], _WORKER["model"]
    msg = codec.decode(model_bytes)
    model.load_state_dict(msg.tensors)
    data = _WORKER["train"].subset(_WORKER["parts"][client])
    update = local_round(model, data, config.method_config, config.local_config, lr=lr,
                         seed=client_seed(config.seed, rnd, str(client)))
    tensors = update.tensors
    if client < config.attackers:
        tensors = poison(tensors, msg.tensors, config.attack, config.attack_factor)
    # the clock stays out of the upload, so bytes_up is the same in every run of
    # a configuration (a resumed one too)
    meta = {k: v for k, v in update.metrics.items() if k != "train_seconds"}
    reply = codec.Message(kind="update", round=rnd, sender=f"client-{client}",
                          method=config.method, tensors=tensors,
                          num_examples=update.num_examples, meta=meta)
    return codec.encode(reply, config.encoding)


def poison(tensors: dict[str, np.ndarray], global_tensors: dict[str, np.ndarray],
           attack: str, s: float) -> dict[str, np.ndarray]:
    """An attacker's upload from its trained ``tensors``: ``scale`` global + s*delta,
    ``signflip`` global - s*delta, ``big`` s*model (float tensors, float32;
    integer buffers are sent as trained)."""
    out = {}
    for name, t in tensors.items():
        if t.dtype.kind != "f":
            out[name] = t
            continue
        g = global_tensors[name].astype(np.float64)
        x = t.astype(np.float64)
        value = {"scale": lambda: g + s * (x - g), "signflip": lambda: g - s * (x - g),
                 "big": lambda: s * x}[attack]()
        out[name] = value.astype(np.float32)
    return out


# ---- the simulation ---------------------------------------------------------------


class InProcess(Transport):
    """The round loop's transport inside this process: every client is available
    and answers (no deadline), in this process or in a worker pool; the global
    model and each update cross the wire codec as bytes."""

    sender = "server"

    def __init__(self, client_ids: list[str], pool: ProcessPoolExecutor | None = None):
        self.client_ids = list(client_ids)
        self.pool = pool
        self._rnd = 0
        self._plan: list[ClientInstruction] = []
        self._model = b""
        self._pending: list = []
        self._arrivals: Arrivals | None = None

    def open(self, rnd: int) -> None:
        self._rnd, self._plan, self._pending, self._arrivals = rnd, [], [], None

    def available(self) -> list[str]:
        return list(self.client_ids)

    def announce(self, rnd: int, attempt: int, plan: list[ClientInstruction],
                 model: bytes) -> None:
        """Hand the model to the clients (submitted to the pool at once)."""
        self._rnd, self._plan, self._model = rnd, list(plan), model
        self._arrivals = None
        if self.pool is not None:
            self._pending = [self.pool.submit(client_task, int(p.client_id), rnd,
                                              p.config["lr"], model) for p in plan]

    def collect(self, deadline: float, quorum: int) -> Arrivals:
        """Every selected client's decoded reply (each client trains to the end);
        a reply for another round or of another kind is a failure."""
        if self._arrivals is not None:
            return self._arrivals
        if self.pool is not None:
            replies = [f.result() for f in self._pending]
        else:
            replies = [client_task(int(p.client_id), self._rnd, p.config["lr"],
                                   self._model) for p in self._plan]
        arrivals = Arrivals(bytes_up=sum(len(b) for b in replies))
        for p, data in zip(self._plan, replies, strict=True):
            msg = codec.decode(data)
            if msg.round != self._rnd or msg.kind != "update":
                reason = f"stale or wrong message (round {msg.round}, kind {msg.kind})"
                arrivals.failures.append((p.client_id, reason))
                continue
            arrivals.results.append(ClientResult(p.client_id, msg.tensors,
                                                 msg.num_examples, msg.meta))
        self._arrivals = arrivals
        return arrivals

    def acknowledge(self, rnd: int, counted: list[str]) -> None:
        self._pending, self._arrivals = [], None


class Simulation:
    """Holds the data split, the server strategy and the round loop of a run.

    ``emit(event, **fields)`` (settable later as ``loop.emit``) receives every
    round's metrics event."""

    def __init__(self, config: SimConfig, emit=None):
        self.config = c = config
        train = load_dataset(c.data, "train")
        test = load_dataset(c.data, "test")
        if c.train_limit is not None:
            train = train.subset(np.arange(min(c.train_limit, len(train))))
        if c.test_limit is not None:
            test = test.subset(np.arange(min(c.test_limit, len(test))))
        if c.clients > len(train):
            raise ConfigError(f"simulate clients: expected at most {len(train)} (one "
                              f"example each), got {c.clients}")
        self.train, self.test = train, test
        parts = client_parts(train, c.clients, c.lda_alpha, seed=c.seed)
        self.val_parts = None
        if c.val_share > 0:
            parts, self.val_parts = partition.split_validation(parts, c.val_share,
                                                               seed=c.seed)
        self.parts = parts
        self.skew = partition.label_skew(parts, train.labels, len(train.classes))
        self.eval_model, self.strategy, self.evaluate_tensors = server_side(c, test)
        self.client_ids = [str(i) for i in range(c.clients)]
        self._pool = None
        if c.workers > 1:
            self._pool = ProcessPoolExecutor(
                max_workers=c.workers, mp_context=_spawn(),
                initializer=_init_worker, initargs=(c, train, parts))
        else:
            _init_client_side(c, train, parts)
        self.transport = InProcess(self.client_ids, self._pool)
        self.loop = RoundLoop(self.strategy, self.transport,
                              self.eval_model.state_dict(),
                              policy=simulation_policy(c), method=c.method,
                              encoding=c.encoding, evaluate_fn=self.evaluate_tensors,
                              model_stats=model_stats(self.eval_model), emit=emit)

    @property
    def global_tensors(self) -> dict[str, np.ndarray]:
        """The current global model's tensors (the loop's)."""
        return self.loop.tensors

    def global_model(self):
        """The current global model as a Model (for checkpoints and export)."""
        self.eval_model.load_state_dict(self.global_tensors)
        return self.eval_model

    def state(self) -> dict[str, np.ndarray]:
        """What a resumed run needs beyond its config and round: the global tensors
        (also the screening reference; sampling and client seeds are functions of
        (seed, round, client) and need no state)."""
        return self.global_tensors

    def restore(self, tensors: dict[str, np.ndarray], *, next_round: int = 0,
                totals: dict | None = None) -> None:
        """Continue from a saved ``state()`` (names, shapes and dtypes checked) at
        round ``next_round`` with the cumulative byte ``totals``."""
        like = self.eval_model.state_dict()
        problem = tensors_problem(tensors, like)
        if problem:
            raise ConfigError(f"simulate resume: the saved global model does not fit "
                              f"the configured model: {problem}")
        self.loop.tensors = {k: np.array(tensors[k]) for k in like}
        self.loop.next_round = next_round
        self.loop.totals.update(totals or {})
        self.strategy.set_global(self.global_tensors)
        self.eval_model.load_state_dict(self.global_tensors)

    def run_round(self, rnd: int) -> RoundRecord:
        """One round of the loop (its event goes to ``loop.emit``)."""
        return self.loop.run_round(rnd)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def simulation_policy(c: SimConfig) -> RoundPolicy:
    """In one process every sampled client answers: no deadline, one attempt."""
    return RoundPolicy(rounds=c.rounds, quorum=c.min_clients, eval_every=c.eval_every)


def model_stats(model):
    """``stats(tensors)``: the global sparsity and per-layer nonzero counts of the
    conv/linear weights of ``tensors`` (loaded into the scratch ``model``)."""
    def stats(tensors: dict[str, np.ndarray]) -> dict:
        model.load_state_dict(tensors)
        return {"global_sparsity": pruning.global_sparsity(model),
                "nonzeros": pruning.nonzeros(model)}
    return stats


def client_parts(train: Dataset, clients: int, lda_alpha: float | None, *,
                 seed: int) -> list[np.ndarray]:
    """Example indices of each client: IID (``lda_alpha`` None) or Dirichlet label
    skew; the same split for the simulation and ``sparsefedpp partition``."""
    if clients > len(train):
        raise ConfigError(f"clients: expected at most {len(train)} (one example each), "
                          f"got {clients}")
    if lda_alpha is None:
        return partition.iid(train.labels, clients, seed=seed)
    return partition.dirichlet(train.labels, clients, lda_alpha, seed=seed)


def server_side(c: SimConfig, test: Dataset):
    """The aggregator's model (initial global weights, seeded), its FedAvg strategy
    (screening, aggregator; its global model starts as the model's weights; no
    pruning of the aggregate unless ``server_prune``; every instruction carries
    the round's ``lr``) and ``evaluate_fn(tensors)``
    (test loss and accuracy of a global model as is, its density, and the same
    metrics of a copy pruned globally to the method's sparsity, ``*_pruned``), as
    the simulation and ``sparsefedpp serve`` both build them."""
    model = models.build(c.model, num_classes=len(test.classes), width=c.width,
                         alpha=c.model_alpha, in_channels=test.images.shape[1],
                         seed=c.seed)

    def evaluate_fn(tensors: dict[str, np.ndarray]) -> dict:
        model.load_state_dict(tensors)
        return evaluate(model, test)

    sparsity = c.method_config.spec.eval_sparsity(c.method_config)
    strategy = FedAvg(per_round=c.per_round, min_clients=c.min_clients, seed=c.seed,
                      round_config=lambda rnd: {"lr": c.lr_at(rnd)},
                      prune_to=sparsity if c.server_prune else None,
                      prune_scope=c.method_config.prune_scope,
                      prune_model=model, evaluate_fn=evaluate_fn,
                      eval_pruned=sparsity, prune_floor=c.layer_floor,
                      eval_sparsities=tuple(c.eval_sparsities),
                      initial=model.state_dict(), aggregator=c.aggregator, trim=c.trim,
                      screen_median=c.screen_median, screen_global=c.screen_global,
                      max_examples=c.max_examples)
    return model, strategy, strategy.evaluate_global


def announced_local(local: LocalConfig) -> dict:
    """The local settings every device follows; not ``recompute``, which each
    device chooses for its own memory (and which older devices do not know)."""
    return {k: v for k, v in asdict(local).items() if k != "recompute"}


def device_round_config(c: SimConfig, rnd: int, test: Dataset) -> dict:
    """What a device needs to train round ``rnd`` (sent in the round announcement):
    the model to build, the method, local SGD, the learning rate, the encoding and
    the federation's normalisation constants."""
    return {"model": {"name": c.model, "width": c.width, "alpha": c.model_alpha,
                      "num_classes": len(test.classes),
                      "in_channels": int(test.images.shape[1])},
            "method": asdict(c.method_config), "local": announced_local(c.local_config),
            "lr": c.lr_at(rnd), "encoding": c.encoding,
            "mean": list(test.mean), "std": list(test.std)}


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def config_dict(config: SimConfig) -> dict:
    d = asdict(config)
    d["eval_sparsities"] = list(config.eval_sparsities)
    return d
