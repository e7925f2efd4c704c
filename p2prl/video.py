"""MP4 videos of evaluation episodes, through gymnasium's RecordVideo (moviepy: the `video` extra).

The recorder wraps the env gymnasium made, beneath p2prl's wrappers (`make_single_env(inner=...)`), so
it films the game itself: an Atari video holds the emulator's 210x160 colour frames, all 60 a second,
not the 84x84 grey stack the network sees. Classic control and Box2D render with pygame, headless.

MuJoCo renders offscreen only through an OpenGL context without a display: EGL (a GPU driver or Mesa;
Debian/Ubuntu `apt-get install libegl1`, then `MUJOCO_GL=egl`) or OSMesa (CPU only, slower;
`apt-get install libosmesa6`, then `MUJOCO_GL=osmesa`). Without one the video is skipped with one line
saying so, and the evaluation itself still runs.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np

from p2prl.atomic import move_atomic
from p2prl.config import EnvConfig
from p2prl.envs import gl_problem  # noqa: F401 (video.gl_problem: part of this module's interface)

# RecordVideo holds every frame of a video in memory until it writes the file: a cap per video keeps
# that bounded (a minute of Atari play, 360 MB; CartPole's 500 steps and MuJoCo's 1000 fit whole).
MAX_FRAMES = 3600
ATARI_FPS = 60  # the console draws 60 frames a second; ale-py's metadata says 30, which plays at half speed
MUJOCO_GL = ("MuJoCo renders offscreen through EGL or OSMesa: apt-get install libegl1 and set MUJOCO_GL=egl "
             "(or apt-get install libosmesa6 and set MUJOCO_GL=osmesa)")


def missing_extra() -> Optional[str]:
    """Why `--video` cannot work in this environment (moviepy missing), or None."""
    if importlib.util.find_spec("moviepy") is None:
        return '--video needs the video extra (moviepy): pip install -e ".[video]"'
    return None


def render_problem(env: gym.Env) -> Optional[str]:
    """Why `env` (made with render_mode="rgb_array") cannot film here, or None; it renders once to know."""
    mujoco = "mujoco" in type(env.unwrapped).__module__
    name = env.spec.id if env.spec else type(env.unwrapped).__name__
    # Without a display, MuJoCo's default GLFW context fails inside C code; no need to try.
    if mujoco and sys.platform.startswith("linux") and not os.environ.get("MUJOCO_GL") \
            and not os.environ.get("DISPLAY"):
        return f"{name} has no display to render on and MUJOCO_GL is not set; {MUJOCO_GL}"
    try:
        env.reset(seed=0)
        frame = env.render()
    except Exception as e:  # whatever the renderer raises: OpenGL, EGL, a missing display or library
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{name} cannot render here ({reason})" + (f"; {MUJOCO_GL}" if mujoco else "")
    if not (isinstance(frame, np.ndarray) and frame.ndim == 3):
        return f"{name} renders no RGB frames (render() gave {type(frame).__name__})"
    return None


def fps(cfg: EnvConfig) -> Optional[int]:
    """Frames per second of the video: every emulator frame under the Atari wrapper, else the env's own
    `render_fps` (None: RecordVideo reads it)."""
    return ATARI_FPS if cfg.wrapper == "atari" else None


class EpisodeVideo(gym.wrappers.RecordVideo):
    """RecordVideo whose videos end with their episode. (With a frame cap, gymnasium's own keeps
    recording into the next episode, untriggered, until the cap or close.)"""

    def reset(self, **kwargs):
        if self.recording:
            self.stop_recording()
        return super().reset(**kwargs)


class Recorder:
    """Films the first `episodes` episodes of the env it wraps into `folder`/<prefix>-episode-<i>.mp4.

    Use: `env = make_single_env(cfg, inner=rec.wrap, render_mode="rgb_array")`, run the episodes,
    `env.close()` (which writes the last video), then `rec.finish()`. Videos are written in a temp dir
    beside `folder`'s files and moved there whole; `skipped` says why nothing was filmed, if so.
    """

    def __init__(self, folder: Path, prefix: str, episodes: int, frames_per_s: Optional[int] = None) -> None:
        self.folder, self.prefix, self.episodes, self.fps = Path(folder), prefix, episodes, frames_per_s
        self.skipped: Optional[str] = None
        self._tmp: Optional[Path] = None

    def wrap(self, env: gym.Env) -> gym.Env:
        # Frames for a file need no window: unless told otherwise, pygame's SDL takes its dummy video
        # driver instead of probing for a display (which, headless, ends the run with an error line).
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        self.skipped = render_problem(env)
        if self.skipped:
            return env
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=".recording-", dir=self.folder))
        # A folder RecordVideo creates itself (it warns of "overwriting" one that exists).
        return EpisodeVideo(env, str(self._tmp / "mp4"), episode_trigger=lambda i: i < self.episodes,
                            video_length=MAX_FRAMES, name_prefix=self.prefix, fps=self.fps, disable_logger=True)

    def finish(self) -> list[Path]:
        """The videos, moved into `folder`, in episode order (replacing those of an earlier evaluation
        of the same checkpoint)."""
        if self._tmp is None:
            return []
        def episode(p: Path) -> int:
            found = re.search(r"-episode-(\d+)\.mp4$", p.name)
            return int(found.group(1)) if found else -1
        out = []
        for f in sorted(self._tmp.glob("mp4/*.mp4"), key=episode):
            move_atomic(f, self.folder / f.name)
            out.append(self.folder / f.name)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        return out
