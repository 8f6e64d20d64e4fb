"""``sparsefedpp client``: a device agent of an MQTT federation (trainer/device_agent.py)."""

from __future__ import annotations

from sparsefedpp.trainer.data import load_dataset
from sparsefedpp.trainer.memory_budget import parse_size
from sparsefedpp.trainer.device_agent import AgentConfig, DeviceAgent

from .flags import add_broker_flags, add_common, broker_settings, setup_logging
from .device_check import run_checks


def add_parser(sub) -> None:
    p = sub.add_parser("client", help="run a device agent of an MQTT federation",
                       description="Connect to the broker (durable session, QoS 1, last "
                       "will), train when selected, upload the update; keeps the "
                       "update on disk until the aggregator acknowledges it.")
    p.add_argument("--id", required=True, dest="device_id",
                   help="device id (also the default MQTT user name)")
    p.add_argument("--data", required=True,
                   help="this device's training data: .npz, CIFAR-10 folder, IDX "
                   "folder or 'fashion-mnist' (train split)")
    p.add_argument("--state", default=None,
                   help="folder for the pending update (default sfpp-state/<id>)")
    p.add_argument("--prefix", default="sfpp", help="topic prefix (default sfpp)")
    p.add_argument("--chunk-kib", type=int, default=256,
                   help="largest MQTT payload in KiB (default 256)")
    p.add_argument("--ack-timeout", type=float, default=60.0,
                   help="re-send an unacknowledged update after this many seconds")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help="give up if the first connection fails for this long "
                   "(default: keep retrying)")
    p.add_argument("--exit-when-finished", action="store_true",
                   help="exit once the aggregator reports the federation finished")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="exit after training this many rounds (and their acks)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of a round, e.g. 256M: picks the largest batch "
                   "size (the announced one, then halving) that fits, refuses if none; "
                   "turns on --recompute first when that is enough")
    p.add_argument("--recompute", action="store_true",
                   help="rebuild each residual block's activations in backward instead "
                   "of holding them: the same training bit for bit, about half the "
                   "activation memory, one more forward per block")
    p.add_argument("--check", action="store_true",
                   help="check the settings, data, kernel cache, broker, credentials "
                   "and TLS, print what is wrong and how to fix it; start no round")
    add_broker_flags(p, default_user="the device id")
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> int:
    setup_logging(args.quiet, args.debug)
    state = args.state or f"sfpp-state/{args.device_id}"
    if args.check:
        return run_checks(device_id=args.device_id, data=args.data, state_dir=state,
                          settings_of=lambda: broker_settings(args, args.device_id),
                          timeout=args.connect_timeout or 10.0)
    config = AgentConfig(device_id=args.device_id,
                         state_dir=state,
                         prefix=args.prefix, chunk_bytes=args.chunk_kib * 1024,
                         ack_timeout=args.ack_timeout,
                         connect_timeout=args.connect_timeout,
                         exit_when_finished=args.exit_when_finished,
                         max_rounds=args.max_rounds,
                         max_memory=None if args.max_memory is None
                         else parse_size(args.max_memory),
                         recompute=args.recompute)
    broker = broker_settings(args, args.device_id)
    broker.check_files()
    data = load_dataset(args.data, "train")
    DeviceAgent(config, data, broker).run()
    return 0
