"""`python -m p2prl.evaluate RUN_DIR --video`: MP4s of greedy episodes, the game's own frames, and the
clean refusals and skips (no video extra; MuJoCo without an offscreen OpenGL)."""
import ctypes.util
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2prl import evaluate, video
from p2prl.checks import ConfigError
from p2prl.envs import make_single_env

pytestmark = pytest.mark.timeout(150)
ROOT = Path(__file__).resolve().parents[1]
HAS_MOVIEPY = importlib.util.find_spec("moviepy") is not None
HAS_ALE = importlib.util.find_spec("ale_py") is not None and importlib.util.find_spec("cv2") is not None
HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None
needs_moviepy = pytest.mark.skipif(not HAS_MOVIEPY, reason='needs the video extra: pip install -e ".[video]"')
TINY_PPO = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=1",
            "train.total_steps=64", "train.log_every_steps=64", "train.target_return=null"]


def evaluate_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2prl.evaluate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def clip_props(path: Path) -> tuple[tuple[int, int], float, float]:
    """((width, height), frames per second, duration in s) of an MP4."""
    from moviepy.video.io.VideoFileClip import VideoFileClip
    clip = VideoFileClip(str(path))
    try:
        return tuple(clip.size), clip.fps, clip.duration
    finally:
        clip.close()


@needs_moviepy
def test_cartpole_videos_of_the_first_episodes(run_dir, cli):
    p = cli(["algo=ppo", "env=cartpole", *TINY_PPO, f"hydra.run.dir={run_dir}"])
    assert p.returncode == 0, p.stderr[-2000:]
    # Headless, as on a server: pygame must not probe for a display (it ended the run with an error line).
    headless = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "XDG_RUNTIME_DIR", "SDL_VIDEODRIVER")}
    e = evaluate_cli(str(run_dir), "--episodes", "3", "--video", "--video-episodes", "2", env=headless)
    assert e.returncode == 0 and "XDG_RUNTIME_DIR" not in e.stderr, e.stderr
    printed = [Path(line.removeprefix("video: ")) for line in e.stdout.splitlines() if line.startswith("video: ")]
    assert printed == [run_dir / "videos" / f"step_64-episode-{i}.mp4" for i in range(2)]
    for f in printed:
        assert f.stat().st_size > 0
        assert clip_props(f)[0] == (600, 400)  # CartPole's own 600x400 picture
    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == [f.name for f in printed]  # no temp dir left
    res = json.loads((run_dir / "eval.json").read_text())
    assert res["videos"] == [str(f) for f in printed] and res["video_skipped"] is None and len(res["returns"]) == 3


@needs_moviepy
@pytest.mark.skipif(not HAS_ALE, reason="needs the atari extra")
def test_atari_video_holds_the_games_frames_not_the_networks_input(compose, tmp_path):
    cfg = compose("env=breakout", "env.max_episode_steps=200").env  # the limit counts emulator frames
    rec = video.Recorder(tmp_path / "videos", "breakout", 1, video.fps(cfg))
    env = make_single_env(cfg, inner=rec.wrap, render_mode="rgb_array")
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (4, 84, 84)  # what the network sees
        assert evaluate.run_episodes(env, lambda obs: 0, episodes=1, seed=0)
    finally:
        env.close()
    (f,) = rec.finish()
    size, fps, duration = clip_props(f)
    assert size == (160, 210) and fps == video.ATARI_FPS
    # Every emulator frame, not every 4th: the reset frame and the 200 frames up to the time limit.
    assert abs(duration * fps - 201) <= 2


@pytest.mark.parametrize("flag", ["--episodes", "--video-episodes"])
def test_episode_counts_must_be_positive(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path), flag, "0"])
    assert e.value.code == 2 and f"{flag}=0: must be a positive integer" in capsys.readouterr().err


def test_video_without_the_extra_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "moviepy", None)  # find_spec then says it is not installed
    assert evaluate.main([str(tmp_path), "--video"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'p2prl: error: --video needs the video extra (moviepy): pip install -e ".[video]"'


def test_a_mujoco_gl_backend_without_its_library_is_refused_before_mujoco_fails_to_import(monkeypatch, compose):
    pendulum = "gymnasium.envs.mujoco.inverted_pendulum_v5:InvertedPendulumEnv"
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert "needs libOSMesa, which is not installed (apt-get install libosmesa6)" in video.gl_problem(pendulum)
    assert video.gl_problem("gymnasium.envs.classic_control.cartpole:CartPoleEnv") is None  # not MuJoCo
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so")
    assert video.gl_problem(pendulum) is None
    monkeypatch.delenv("MUJOCO_GL")
    assert video.gl_problem(pendulum) is None  # no backend named: only the video is skipped, later
    # Wherever an env is made (the precheck, evaluate, p2prl.load): one line, not PyOpenGL's AttributeError.
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(ConfigError, match="^MUJOCO_GL=osmesa: needs libOSMesa, which is not installed"):
        make_single_env(compose("env=halfcheetah").env)


def one_skip_line(e: subprocess.CompletedProcess) -> str:
    lines = [line for line in e.stderr.splitlines() if line.strip()]
    assert e.returncode == 0 and len(lines) == 1 and "Traceback" not in e.stderr, e.stderr
    assert lines[0].startswith("p2prl: video skipped: InvertedPendulum-v5") and "mean return" in e.stdout
    return lines[0]


@needs_moviepy
@pytest.mark.skipif(not HAS_MUJOCO, reason="needs the mujoco extra")
def test_mujoco_video_needs_an_offscreen_gl(run_dir, cli):
    p = cli(["algo=ppo", "env=gym", "env.id=InvertedPendulum-v5", *TINY_PPO, f"hydra.run.dir={run_dir}"])
    assert p.returncode == 0, p.stderr[-2000:]
    bare = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY")}
    line = one_skip_line(evaluate_cli(str(run_dir), "--episodes", "1", "--video", env=bare))
    assert "MUJOCO_GL=egl" in line and "libegl1" in line and "libosmesa6" in line
    res = json.loads((run_dir / "eval.json").read_text())
    assert res["videos"] == [] and res["video_skipped"] == line.removeprefix("p2prl: video skipped: ")
    # With EGL, where this machine has it, the video; without, the same one line.
    e = evaluate_cli(str(run_dir), "--episodes", "1", "--video", env={**bare, "MUJOCO_GL": "egl"})
    if "video skipped" in e.stderr:
        assert "MUJOCO_GL=egl" in one_skip_line(e)
        return
    assert e.returncode == 0, e.stderr
    (f,) = json.loads((run_dir / "eval.json").read_text())["videos"]
    assert f"video: {f}" in e.stdout and clip_props(Path(f))[0] == (480, 480)
