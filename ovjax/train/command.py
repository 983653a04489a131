"""`python -m ovjax train`: one training stage (the loop: ovjax/train/loop.py).

    python -m ovjax train --config configs/stage1.py:tiny --workdir DIR [--config.a.b=value ...]

Config: `--config FILE.py:ARG` plus typed `--config.a.b=value` overrides (ovjax/config.py); the schema is
in ovjax/train/config.py and configs/. Data: `data.train` = a packed directory (`python -m ovjax pack`, or
`python -m ovjax synth` for the synthetic set); empty, the tiny presets make the synthetic set first.
Several processes: see ovjax/distributed.py (OVJAX_* or SLURM variables; launch/local_multiprocess.sh).
Exit status: 0 done, 2 config or launch error, 3 stopped on a non-finite loss, 75 a peer process was lost.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ovjax import config
    from ovjax.train import loop

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = config.split_overrides(argv)
        parser = argparse.ArgumentParser(prog="python -m ovjax train", description=__doc__.split("\n\n")[0],
                                         epilog="Overrides: --config.a.b=value (ovjax/config.py).")
        parser.add_argument("--config", required=True, help="FILE.py:ARG, e.g. configs/stage1.py:tiny")
        parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, tb)")
        args = parser.parse_args(rest)
        cfg = config.load(args.config, overrides)
    except config.ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    from ovjax import distributed, sharding

    try:  # several processes (ovjax/distributed.py): join, check the mesh fits the hosts, report
        distributed.initialize()
        print(distributed.startup_report(sharding.make_mesh(cfg.mesh)), flush=True)
    except (distributed.DistributedError, sharding.ShardingError) as e:
        print(f"train: launch error: {e}", file=sys.stderr)
        return 2
    try:
        loop.run(cfg, args.workdir)
    except loop.NonFiniteLoss as e:
        print(f"train: {e}", file=sys.stderr)
        return 3
    except config.ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    except Exception:
        distributed.wait_for_lost_peer()  # a collective failed because a peer died: name it, exit 75
        raise
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
