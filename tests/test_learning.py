"""Short learning checks on 2 real peers: each tuned preset to its env's default target, fixed seeds, and
a margin on the steps measured for that seed (deselected by default: `python -m pytest -m slow`)."""
import importlib.util
import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
HAS_BOX2D = importlib.util.find_spec("Box2D") is not None
HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None


def reach(cli, run_dir, *overrides):
    p = cli([*overrides, f"hydra.run.dir={run_dir}"], nproc=2, timeout=400)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads((run_dir / "summary.json").read_text())


# (overrides, steps within which seed 0 reaches the env's default target; measured on a 2-core CPU machine)
CASES = [
    pytest.param(("algo=ppo", "env=cartpole"), 50_000, id="ppo-cartpole"),  # 475: 28.7k measured
    pytest.param(("algo=dqn", "env=cartpole"), 150_000, id="dqn-cartpole"),  # 475: 62k
    pytest.param(("algo=a2c", "env=cartpole"), 400_000, id="a2c-cartpole"),  # 475: 153k
    pytest.param(("algo=ppo", "env=acrobot"), 150_000, id="ppo-acrobot"),  # -100: 76k
    pytest.param(("algo=ppo", "env=pendulum"), 150_000, id="ppo-pendulum"),  # -200: 61k
    pytest.param(("algo=ppo", "env=lunarlander"), 600_000, id="ppo-lunarlander",  # 200: 287k
                 marks=pytest.mark.skipif(not HAS_BOX2D, reason="needs the box2d extra")),
    pytest.param(("algo=ppo", "env=halfcheetah"), 200_000, id="ppo-halfcheetah",  # 1500: 72k
                 marks=pytest.mark.skipif(not HAS_MUJOCO, reason="needs the mujoco extra")),
]


@pytest.mark.parametrize("overrides,within", CASES)
def test_preset_reaches_its_target_on_two_peers(overrides, within, run_dir, cli):
    s = reach(cli, run_dir, *overrides, "seed=0")
    assert s["reached"] and s["steps_to_target"] <= within, (s["final_step"], s["episode_return_mean"])
