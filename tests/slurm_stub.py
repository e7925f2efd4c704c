"""Stand-ins for SLURM's sbatch, srun, sacct, scontrol and scancel that run a job's "nodes" on this machine,
for submitit's SLURM executor (Hydra's submitit_slurm launcher) in the tests.

`install(bin_dir, state_dir)` writes the commands into bin_dir (put it first on PATH). sbatch starts the
batch script of each array task in the background with SLURM's job variables (one id per task, the
allocation's nodes all `localhost`) and records its state in state_dir; srun starts the script's
command once per task with the task's variables and its output files; sacct reports the recorded
states. `scontrol requeue ID` has the job's batch script run again, with SLURM_RESTART_COUNT one higher,
once the current attempt's script ends (SLURM would also end the attempt's tasks at once; submitit's
rank 0 exits right after requeueing, and p2prl's other peers end the run with it). Everything these
stubs start carries P2PRL_STUB_STATE: `started(state_dir)` finds it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "scontrol", "scancel")


def install(bin_dir: Path, state_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nP2PRL_STUB_STATE="{state_dir}" exec "{sys.executable}" "{__file__}" {name} "$@"\n')
        path.chmod(0o755)


def _state() -> Path:
    return Path(os.environ["P2PRL_STUB_STATE"])


def sbatch(script: str) -> None:
    text = Path(script).read_text()
    opts = {k: v for k, v in re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M)}
    counter = _state() / "next_id"
    base = int(counter.read_text()) if counter.exists() else 7000
    counter.write_text(str(base + 100))
    m = re.match(r"(\d+)-(\d+)", opts.get("array", ""))
    indices = list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [None]
    nodes, per_node = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
    for i in indices:
        env = {**os.environ, "SLURM_JOB_ID": str(base + (0 if i is None else i + 1)), "SLURM_NNODES": str(nodes),
               "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node),
               "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
               "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes), "SLURM_SUBMIT_DIR": os.getcwd()}
        if i is not None:
            env.update(SLURM_ARRAY_JOB_ID=str(base), SLURM_ARRAY_TASK_ID=str(i))
        name = str(base) if i is None else f"{base}_{i}"
        subprocess.Popen([sys.executable, __file__, "_run", name, script], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (_state() / f"job_{name}").write_text("RUNNING")
    print(f"Submitted batch job {base}")


def _run(name: str, script: str) -> None:
    restarts = 0
    while True:
        code = subprocess.call(["bash", script], env={**os.environ, "SLURM_RESTART_COUNT": str(restarts)})
        requeued = _state() / f"requeue_{name}"
        if not requeued.exists():
            break
        requeued.unlink()
        restarts += 1
        (_state() / f"restarts_{name}").write_text(str(restarts))
    (_state() / f"job_{name}").write_text("COMPLETED" if code == 0 else "FAILED")


def started(state_dir: Path, task_var: str = "P2PRL_STUB_STATE") -> list[int]:
    """The processes these stubs started for state_dir that have `task_var` in their environment
    (SLURM_PROCID: srun's tasks)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError):
            continue  # not a process, or gone
        if env.get(b"P2PRL_STUB_STATE") == str(state_dir).encode() and task_var.encode() in env:
            out.append(int(proc.name))
    return out


def _pattern(path: str, task: int) -> str:
    env = os.environ
    for k, v in (("%A", env.get("SLURM_ARRAY_JOB_ID", "")), ("%a", env.get("SLURM_ARRAY_TASK_ID", "")),
                 ("%j", env["SLURM_JOB_ID"]), ("%t", str(task))):
        path = path.replace(k, v)
    return path


def srun(args: list[str]) -> int:
    files, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("--output", "--error"):
            files[args[i]] = args[i + 1]
            i += 2
        else:
            i += 1
    command = args[i:]
    nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
    procs = []
    for task in range(nodes * per_node):
        env = {**os.environ, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task % per_node),
               "SLURM_NODEID": str(task // per_node), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
               "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_TASKS_PER_NODE": os.environ["SLURM_TASKS_PER_NODE"],
               "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"]}
        # Without --output/--error, srun passes its tasks' output on as its own.
        out = open(_pattern(files["--output"], task), "a") if "--output" in files else None
        err = open(_pattern(files["--error"], task), "a") if "--error" in files else out
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
    return max(p.wait() for p in procs)


def sacct(args: list[str]) -> None:
    bases = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for path in sorted(_state().glob("job_*")):
        name = path.name[len("job_"):]
        if name.split("_")[0] in bases:
            print(f"{name}|{path.read_text()}|localhost")


def main(argv: list[str]) -> int:
    name, args = argv[0], argv[1:]
    if name == "sbatch":
        sbatch(args[-1])
    elif name == "_run":
        _run(*args)
    elif name == "srun":
        return srun(args)
    elif name == "sacct":
        sacct(args)
    elif name == "scontrol" and args[:2] == ["show", "hostnames"]:
        print("\n".join(args[2].split(",")))
    elif name == "scontrol" and args[:1] == ["requeue"]:
        (_state() / f"requeue_{args[1]}").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
