"""Start, stop or inspect a throw-away Slurm cluster on this machine (one node, or --nodes N).

    python tools/slurm_local.py start  --dir /tmp/l2c-slurm     # prints: export SLURM_CONF=...
    python tools/slurm_local.py start  --dir /tmp/l2c-slurm2 --nodes 2   # node1, node2 in network namespaces
    eval "$(python tools/slurm_local.py start --dir /tmp/l2c-slurm)"
    sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 slurm/stage1.sh cfg.yaml
    python tools/slurm_local.py status --dir /tmp/l2c-slurm
    python tools/slurm_local.py stop   --dir /tmp/l2c-slurm

Needs root and Debian's slurm-wlm (munge comes with it). The daemons (munged, slurmctld, slurmd)
keep running after this command returns; `stop` cancels all jobs and ends them by PID. The
machinery is tests/slurm_cluster.py, the same the tests use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.slurm_cluster import LocalSlurm, SlurmStartError, SlurmUnavailable  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start", "stop", "status"])
    ap.add_argument("--dir", required=True, help="directory for slurm.conf, logs and state")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs each node advertises (default: nproc, min 2)")
    ap.add_argument("--nodes", type=int, default=1,
                    help="nodes; 2 or more run each slurmd in its own network namespace (docs/SLURM.md)")
    args = ap.parse_args(argv)
    root = Path(args.dir).resolve()
    state = root / "cluster.json"

    if args.command == "start":
        if state.exists():
            cluster = LocalSlurm.attach(root)
            if cluster.running:
                print(f"# already running (pids {cluster.pids()})", file=sys.stderr)
                print(f"export SLURM_CONF={cluster.conf_path}")
                return 0
            cluster.stop()  # leftovers of a dead cluster
        cluster = LocalSlurm(root, cpus=args.cpus, die_with_parent=False, nodes=args.nodes)
        try:
            cluster.start()
        except (SlurmUnavailable, SlurmStartError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"# Slurm up: node(s) {','.join(cluster.node_names)}, {cluster.cpus} CPUs each, pids {cluster.pids()}",
              file=sys.stderr)
        print(f"export SLURM_CONF={cluster.conf_path}")
        return 0

    if not state.exists():
        print(f"no cluster under {root} (no {state.name})", file=sys.stderr)
        return 0 if args.command == "stop" else 1
    cluster = LocalSlurm.attach(root)
    if args.command == "stop":
        cluster.stop()
        print(f"# stopped the cluster under {root}", file=sys.stderr)
        return 0
    info = cluster.describe()
    info["running"] = cluster.running
    if cluster.running:
        info["sinfo"] = cluster.run(["sinfo", "-N", "-h", "-o", "%N %t %c"], check=False).stdout.strip()
        info["squeue"] = cluster.run(["squeue", "-h", "-o", "%i %j %T %M"], check=False).stdout.strip().splitlines()
    print(json.dumps(info, indent=1))
    return 0 if cluster.running else 1


if __name__ == "__main__":
    sys.exit(main())
