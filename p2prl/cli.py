"""The `p2prl` command: one front door to the tools, `p2prl train|evaluate|export|plot|bench ...`.

`p2prl train [--nproc N] OVERRIDES...` starts `python -m p2prl.train OVERRIDES...` (N = 1) or
torchrun (`python -m p2prl.torchrun --standalone --nproc_per_node=N -m p2prl.train OVERRIDES...`, N > 1;
it exits 2 quietly on bad input) and returns its exit code; `p2prl evaluate|export|plot|bench ARGS...`
are `python -m p2prl.evaluate|export|plot|bench ARGS...`. The `python -m` forms and `p2prl-train` stay as they are.

The training job runs as a child process in this process's group, so Ctrl-C at a terminal reaches it
(and torchrun's peers) directly, as it would without this wrapper; a SIGTERM sent to `p2prl` itself
(a scheduler's) is passed on, and `p2prl` returns the job's exit code.
"""
from __future__ import annotations

import argparse
import importlib
import re
import signal
import subprocess
import sys
from typing import Callable, Optional

TRAIN_EXAMPLE = """examples:
  p2prl train algo=ppo env=cartpole                       # one peer
  p2prl train --nproc 2 algo=dqn env=cartpole seed=1      # two peers on this machine (torchrun --standalone)
  p2prl train --nproc 2 -m seed=0,1 algo.lr=1e-3,3e-4     # a Hydra multirun sweep: multirun/<id>/<job>/
  p2prl train -m hydra/launcher=submitit_slurm hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=4 algo.lr=1e-3,3e-4
                                                          # each job of the sweep a SLURM job of 8 peers (submitit)

OVERRIDES are Hydra's, as for python -m p2prl.train (its --help lists the config groups). Across
several machines use torchrun directly (launch/multinode.sh), or SLURM (launch/slurm.sbatch, or the
submitit launcher above: pip install -e ".[submitit]")."""


def train_command(nproc: int, overrides: list[str]) -> list[str]:
    """The command `p2prl train --nproc N OVERRIDES` runs."""
    if nproc == 1:
        return [sys.executable, "-m", "p2prl.train", *overrides]
    return [sys.executable, "-m", "p2prl.torchrun", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "p2prl.train", *overrides]


def run_child(cmd: list[str]) -> int:
    """Run `cmd` to its end; its exit code (128 + N when a signal N ended it, as a shell says)."""
    child = subprocess.Popen(cmd)
    def pass_on(signum: int, _frame) -> None:
        child.send_signal(signum)
    # Ctrl-C reaches the child from the terminal too: this process only waits for it to finish.
    before = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
              signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on)}
    try:
        code = child.wait()
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def launch_train(argv: list[str], prog: str = "p2prl train") -> int:
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage=f"{prog} [-h] [--nproc N] [OVERRIDES ...]",
                                description="Train with N peers on this machine; the run dir is "
                                            "outputs/<algo>-<env>/<run id> (hydra.run.dir=... to choose).",
                                epilog=TRAIN_EXAMPLE)
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="peers on this machine (default 1)")
    # Only the leading options are this command's: everything after them goes to Hydra untouched
    # (-m, --cfg job, hydra.run.dir=...), which argparse would otherwise try to read.
    i = 0
    while i < len(argv) and (argv[i] in ("-h", "--help", "--nproc") or argv[i].startswith("--nproc=")):
        i += 2 if argv[i] == "--nproc" else 1
    a = p.parse_args(argv[:i])
    if a.nproc <= 0:
        p.error(f"--nproc={a.nproc}: must be a positive integer")
    launcher = next((o for o in argv[i:] if re.match(r"\+{0,2}hydra/launcher=submitit", o)), None)
    if a.nproc > 1 and launcher:
        print(f"{prog.split()[0]}: error: --nproc={a.nproc}: {launcher.lstrip('+')} starts each job's peers itself "
              "(hydra.launcher.tasks_per_node x hydra.launcher.nodes); allowed with it: 1", file=sys.stderr)
        return 2
    return run_child(train_command(a.nproc, argv[i:]))


def _tool(module: str) -> Callable[[list[str], str], int]:
    def run(argv: list[str], prog: str) -> int:
        return importlib.import_module(module).main(argv, prog)  # imported on use: torch loads slowly
    return run


COMMANDS: dict[str, tuple[Callable[[list[str], str], int], str]] = {
    "train": (launch_train, "train on N peers (torchrun for N > 1): p2prl train --nproc 2 algo=ppo env=cartpole"),
    "evaluate": (_tool("p2prl.evaluate"), "greedy episodes of a run, eval.json, MP4s with --video"),
    "export": (_tool("p2prl.export"), "a run's greedy policy as one file that acts without p2prl: ONNX, .pt2, .npy"),
    "plot": (_tool("p2prl.plot"), "return curves of runs or sweeps (mean and min-max band over seeds) as a PNG"),
    "bench": (_tool("p2prl.bench.runs"), "benchmarks: time and steps to the target on 1 and 2 peers and with SB3"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: p2prl {{{','.join(COMMANDS)}}} ...\n\nDecentralized peer-to-peer RL.\n\ncommands:\n{rows}\n\n"
            "`p2prl COMMAND --help` says more, with examples.\n")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"p2prl: error: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest, f"p2prl {name}")


if __name__ == "__main__":
    sys.exit(main())
