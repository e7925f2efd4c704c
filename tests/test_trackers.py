"""Trackers: TensorBoard events (read back with TensorBoard's own reader) hold every numeric key of
metrics.jsonl at the same steps; `logger=wandb` writes a W&B run (offline, no network) or, without the
wandb package, is refused with one line and exit 2."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from p2prl.metrics import MetricsWriter
from p2prl.trackers import TensorBoard

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
PPO = ["algo=ppo", "env=cartpole", "algo.num_envs=4", "algo.num_steps=32", "algo.num_minibatches=2",
       "algo.update_epochs=2", "train.total_steps=2048", "train.log_every_steps=256", "train.target_return=null"]
DQN = ["algo=dqn", "env=cartpole", "algo.learning_starts=256", "algo.batch_size=32", "algo.hidden_sizes=[32]",
       "algo.exploration_fraction=0.5", "train.total_steps=2048", "train.log_every_steps=256",
       "train.target_return=null"]


def events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the run's tb/ events, through TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_events_match_rows(tb: dict, metrics: list[dict]) -> None:
    """Every numeric key of metrics.jsonl is a tag with the same (step, value) points (float32)."""
    keys = {k for r in metrics for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert keys <= set(tb), f"keys without a tag: {sorted(keys - set(tb))}"
    for key in keys:
        expected = [(r["step"], r[key]) for r in metrics if isinstance(r.get(key), (int, float))]
        assert [s for s, _ in tb[key]] == [s for s, _ in expected], key
        for (_, got), (_, want) in zip(tb[key], expected):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6), key


def config(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["config"]


def values(tb: dict, tag: str) -> list[float]:
    return [v for _, v in tb[tag]]


def test_tensorboard_holds_returns_losses_speed_comm_lr_kl_and_skips_of_a_2_peer_ppo_run(run_dir, cli):
    p = cli([*PPO, f"hydra.run.dir={run_dir}"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    tb, metrics = events(run_dir), rows(run_dir)
    assert_events_match_rows(tb, metrics)
    for tag in ("episode_return_mean", "episodes", "time_s", "sps", "comm_frac", "lr", "approx_kl", "loss_policy",
                "loss_value", "entropy", "clip_frac", "skipped_updates"):
        assert tag in tb, tag
    assert [s for s, _ in tb["sps"]][-1] == 2048
    assert all(r >= 1 for r in values(tb, "episode_return_mean"))  # CartPole pays 1 per step
    assert all(v > 0 for v in values(tb, "sps"))
    assert all(0 < v < 1 for v in values(tb, "comm_frac"))  # 2 peers spend some, not all, time in collectives
    lr, lr0 = values(tb, "lr"), config(run_dir)["algo"]["lr"]  # annealed from algo.lr (as float32) towards 0
    assert all(0 <= v <= lr0 * (1 + 1e-6) for v in lr) and lr == sorted(lr, reverse=True) and lr[-1] < lr[0]
    assert all(v >= 0 for v in values(tb, "approx_kl"))  # (r - 1) - log r >= 0
    assert values(tb, "skipped_updates") == [0] * len(metrics)


def test_tensorboard_holds_dqn_epsilon_and_td_loss(run_dir, cli):
    p = cli([*DQN, f"hydra.run.dir={run_dir}"])
    assert p.returncode == 0, p.stderr[-3000:]
    tb, metrics = events(run_dir), rows(run_dir)
    assert_events_match_rows(tb, metrics)
    algo = config(run_dir)["algo"]  # epsilon decays linearly over the first half of the budget
    eps = values(tb, "epsilon")  # TensorBoard keeps float32: 0.01 comes back as 0.00999999977
    assert all(algo["eps_end"] - 1e-6 <= v <= algo["eps_start"] + 1e-6 for v in eps)
    assert eps == sorted(eps, reverse=True) and eps[0] > eps[-1] == pytest.approx(algo["eps_end"])
    assert tb["loss_td"] and all(v >= 0 for v in values(tb, "loss_td"))
    assert "q_mean" in tb and "buffer_size" in tb


def test_a_key_new_to_the_rows_reaches_tensorboard_unchanged(tmp_path):
    # What evaluation during training, or any algorithm, adds to a row needs no change to the writer.
    writer = MetricsWriter(tmp_path, 100, enabled=True, trackers=[TensorBoard(tmp_path)])
    writer.write({"step": 10, "sps": 5.0, "episode_return_mean": None, "eval_return_mean": 12.5, "early_stop": True,
                  "steps_by_rank": [5, 5]})
    writer.write({"step": 20, "sps": 6.0, "episode_return_mean": 3.0, "eval_return_mean": 14.0, "early_stop": False,
                  "steps_by_rank": [10, 10]})
    writer.close()
    tb = events(tmp_path)
    assert tb["eval_return_mean"] == [(10, 12.5), (20, 14.0)]
    assert tb["episode_return_mean"] == [(20, 3.0)]  # null before the first episode: no point
    assert "early_stop" not in tb and "steps_by_rank" not in tb and "step" not in tb  # no numbers


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (run-*.wandb): a 7-byte header, then LevelDB's log
    format, 32 KiB blocks of chunks (crc32: 4 bytes, length: 2, type: 1 full | 2 first | 3 middle |
    4 last). Read here because the wandb package ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2
    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_wandb_offline_writes_a_run_with_the_metrics_and_the_config(run_dir, tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    p = subprocess.run([sys.executable, "-m", "p2prl.train", *PPO, "logger=wandb", "logger.tags=[test]",
                        f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == run_dir.name and list(run.tags) == ["test"]
    logged = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert logged["algo.lr"] == config(run_dir)["algo"]["lr"] and logged["train.total_steps"] == 2048
    assert logged["logger.name"] == "wandb"
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    metrics = rows(run_dir)
    assert [h["step"] for h in history] == [r["step"] for r in metrics]  # one W&B row per metrics row
    for h, r in zip(history, metrics):
        for key, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert h[key] == pytest.approx(value), key
    assert (run_dir / "tb").is_dir()  # TensorBoard too


def test_logger_wandb_without_the_package_ends_with_exit_2_and_one_line(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None; from p2prl.train import main; "  # None: `import wandb` fails
            f"sys.argv[1:] = ['logger=wandb', 'hydra.run.dir={tmp_path / 'run'}']; main()")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith('p2prl: error: logger=wandb: needs the wandb package: pip install -e ".[wandb]"')
    assert not (tmp_path / "run").exists()
