"""torchrun's variables for peers that another launcher started: the tasks of a SLURM job step (`srun`,
Hydra's submitit_slurm launcher) and those of submitit's local executor (submitit_local).

Such a peer takes its rank, world size, local rank and node from the launcher's own variables, as
torchrun-free launchers such as Lightning's and submitit's own helpers do, and the address of the store
its rank 0 hosts (p2prl.comm.store) from the job: the step's first node, and a port derived from the
job id. From then on it reads its place as a torchrun worker does.
"""
from __future__ import annotations

import os
import re
from typing import Optional


def _slurm_job_id(env: dict) -> str:
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "0")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `node[01-02,05],gpu3` -> `node01`."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]+)\]([^,]*))?", nodelist.strip())
    prefix, ranges, suffix = m.groups() if m else (nodelist, None, "")
    return prefix if not ranges else prefix + re.split(r"[-,]", ranges)[0] + suffix


def _tasks_on_node(spec: str, node: int) -> Optional[int]:
    """This node's count in SLURM's tasks-per-node list (`2(x3),1`: 2, 2, 2, 1)."""
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else None


def launcher_env(env: Optional[dict] = None) -> dict[str, str]:
    """torchrun's variables for a peer that SLURM (a task of `srun`) or submitit's local executor started:
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (the node) and the address where rank 0
    hosts the peers' store (MASTER_ADDR: the step's first node; MASTER_PORT: from the job id, so every
    task of a job derives the same one and concurrent jobs differ, unless set). {} under torchrun
    (RANK is set), for a single task, or outside these launchers. P2PRL_LAUNCHER_JOB names the job
    (p2prl.host.run_id: the run dir of its peers)."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env:
        return {}
    if "SLURM_PROCID" in env and "SLURM_LOCALID" in env:  # srun's tasks; a batch script has no SLURM_LOCALID
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        rank, local, node = int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env.get("SLURM_NODEID", 0))
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        per_node = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "", node)
        local_world = per_node or max(1, world // nodes)
        addr = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1")
        job = _slurm_job_id(env)
    elif "SUBMITIT_LOCAL_GLOBALID" in env:  # submitit's local executor: every task on this machine
        world = local_world = int(env.get("SUBMITIT_LOCAL_NTASKS", 1))
        rank, local, node = int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env.get("SUBMITIT_LOCAL_LOCALID", 0)), 0
        addr, job = "127.0.0.1", env.get("SUBMITIT_LOCAL_JOB_ID", "0")
    else:
        return {}
    if world <= 1:
        return {}
    port = env.get("MASTER_PORT") or str(20000 + int(re.sub(r"\D", "", job) or 0) % 20000)  # as launch/slurm.sbatch
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(local_world),
            "GROUP_RANK": str(node), "MASTER_ADDR": env.get("MASTER_ADDR") or addr, "MASTER_PORT": port,
            "P2PRL_LAUNCHER_JOB": job}


def adopt_launcher_env() -> None:
    """Export `launcher_env()`: from here on this peer reads its place as under torchrun."""
    os.environ.update(launcher_env())


def peer_rank() -> str:
    """This peer's rank, derived from its launcher's variables where torchrun's are not set (yet): Hydra
    formats a job's log lines before the job adopts them."""
    return os.environ.get("RANK") or launcher_env().get("RANK", "0")
