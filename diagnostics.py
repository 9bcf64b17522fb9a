"""What a run shows of itself, beside the loop: episode videos, each episode's learning diagnostics
(columns of log.csv), the curves of runs (curves.png) and the diagnosis that reads them every 20
episodes. README's "Reading a run" shows what healthy and broken look like.
"""

import csv
import io
import os
import pathlib
import queue
import threading

import numpy as np
import torch

from buffer import write_atomically
from robot import EE_DIM

RECENT = 20          # episodes a diagnosis and the curves average over
SATURATED = 0.99     # an action component at or beyond this magnitude is pushed against the [-1, 1] bound


# --- episode videos ---------------------------------------------------------------------------------
class EpisodeVideo:
    """One episode's video, annotated with the step, the action, the gripper command, who acted and success.
    A thread encodes the frames as they come, behind a bounded queue: memory stays bounded, the control step
    only hands over a picture. WebM/VP8: browsers play it (opencv-python's FFmpeg has no H.264 encoder)."""

    STRIP = 44   # pixels of text under the picture

    def __init__(self, path, fps, render, height, width):
        import cv2
        self.render = render   # picture -> RGB (H, W, 3), run in the thread: the sim's renderer lives there
        self.scale = max(1, 256 // width)   # at least 256 wide, for the text; no wider: encoding costs CPU
        size = (width * self.scale, height * self.scale + self.STRIP)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)   # OpenCV prints a line on every WebM
        os.dup2(devnull, 2)                                             # it opens (a codec tag it replaces)
        os.close(devnull)
        try:
            self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), fps, size)
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        if not self.writer.isOpened():
            raise OSError(f"{path}: OpenCV cannot write a WebM video here; run with --video_every 0")
        self.queue = queue.Queue(maxsize=2 * fps)
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def add(self, picture, step, act, human, success):
        self.queue.put((picture, step, np.array(act), human, success))

    def close(self):
        self.queue.put(None)
        self.thread.join()

    def _write(self):
        import cv2
        while (item := self.queue.get()) is not None:
            picture, step, act, human, success = item
            frame = cv2.resize(self.render(picture)[:, :, ::-1], None, fx=self.scale, fy=self.scale,
                               interpolation=cv2.INTER_NEAREST)
            if human:   # a red frame around the human's steps
                cv2.rectangle(frame, (0, 0), (frame.shape[1] - 1, frame.shape[0] - 1), (0, 0, 255), 6)
            gripper = {-1: "close", 0: "stay", 1: "open"}[int(round(float(act[EE_DIM])))]
            lines = (f"step {step}  {'HUMAN' if human else 'policy'}  {'SUCCESS' if success else ''}",
                     f"{act[0]:+.2f} {act[1]:+.2f} {act[2]:+.2f}  {gripper}")
            frame = np.concatenate([frame, np.zeros((self.STRIP, frame.shape[1], 3), np.uint8)])
            for i, text in enumerate(lines):
                cv2.putText(frame, text, (4, frame.shape[0] - 26 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                            (255, 255, 255), 1, cv2.LINE_AA)
            self.writer.write(frame)
        self.writer.release()
        if hasattr(self.render, "close"):
            self.render.close()


class SimRender:
    """The sim's two cameras side by side, rendered in the video's thread from a copy of the joint state."""

    def __init__(self, world):
        self.model, self.renderer = world.model, None

    def __call__(self, qpos):
        import mujoco
        if self.renderer is None:   # an OpenGL context belongs to the thread that made it
            size = self.model.vis.global_.offwidth   # sim.py sizes the framebuffer to image_size
            self.data, self.renderer = mujoco.MjData(self.model), mujoco.Renderer(self.model, size, size)
        self.data.qpos[:] = qpos
        mujoco.mj_forward(self.model, self.data)
        frames = []
        for camera in ("front", "wrist"):
            self.renderer.update_scene(self.data, camera=camera)
            frames.append(self.renderer.render())
        return np.concatenate(frames, axis=1)

    def close(self):
        if self.renderer is not None:
            self.renderer.close()


def episode_video(path, env, obs, fps):
    """(EpisodeVideo, obs -> picture): obs frames, else the sim's; (None, None) on an arm without cameras."""
    cameras = [k for k, v in obs.items() if v.dtype == np.uint8]
    if cameras:
        height, width = obs[cameras[0]].shape[0], sum(obs[k].shape[1] for k in cameras)
        video = EpisodeVideo(path, fps, lambda frames: np.concatenate(frames, axis=1), height, width)
        return video, lambda o: [o[k] for k in cameras]
    if hasattr(env.world, "model"):
        size = env.world.model.vis.global_.offwidth
        return (EpisodeVideo(path, fps, SimRender(env.world), size, 2 * size),
                lambda o: env.world.data.qpos.copy())
    return None, None


# --- learning diagnostics ---------------------------------------------------------------------------
@torch.no_grad()
def episode_q(agent, episode, features=None, slots=()):
    """The critics' mean Q(s, a) at each step of a finished episode (its own buffer), for the action
    taken: (T,). With the ResNet-10, `features` is the online buffer's FrameFeatures, `slots` the
    episode's there."""
    a, n, device = episode.arrays, len(episode), agent.log_alpha.device
    keys = episode.vector_keys + (episode.image_keys if features is None else [])   # small CNN: frames
    obs = {k: torch.from_numpy(a[k][:n]).to(device) for k in keys}
    if features is not None:
        slots = torch.as_tensor(slots, device=device)
        obs.update({k: features.read(k, slots, torch.zeros_like(slots)) for k in features.table})
    act = torch.from_numpy(a["act"][:n]).to(device)
    return agent.critic(agent.encoder(obs), act[:, :EE_DIM]).mean(0).cpu().numpy()   # SYNC POINT: logging


def episode_diagnostics(episode, policy_act, q, discount):
    """One finished episode's figures for its log row, from its buffer, what the policy proposed at each
    step (T, 4) (the human may have acted instead), and episode_q's Q of each step."""
    a, n = episode.arrays, len(episode)
    rew, intervened = a["rew"][:n], a["intervened"][:n]
    mc_return, future = np.zeros(n), 0.0
    for t in reversed(range(n)):   # the discounted Monte-Carlo return from each step, nothing after the end
        future = rew[t] + discount * future
        mc_return[t] = future
    edges = np.diff(np.concatenate([[0], intervened.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)   # the human's takeovers
    command = np.sign(np.round(a["act"][:n, EE_DIM]))   # -1 close, 0 stay, +1 open, as SO101Env.step rounds
    held = np.concatenate([[1.0], command[command != 0]])   # gripper target: open at reset, then each command
    return {"q/episode": float(q.mean()), "return/mc": float(mc_return.mean()),
            "action/saturated": float((np.abs(policy_act[:, :EE_DIM]) >= SATURATED).mean()),
            "gripper/flips": int(np.count_nonzero(np.diff(held))),   # counted even with --grasp_penalty 0
            "intervention/count": len(starts),
            "intervention/mean_length": float((ends - starts).mean()) if len(starts) else 0.0,
            "intervention/first_step": int(starts[0]) if len(starts) else n}


def diagnose(rows, cfg, entropy_target):
    """The lessons file's failures, read off the last episodes: one line per quantity that is off, with
    what usually causes it. Nothing before diagnose_after_steps: early runs are meant to look rough."""
    if len(rows) < 2 * RECENT or rows[-1]["env_steps"] < cfg.diagnose_after_steps:
        return []
    recent, before = rows[-RECENT:], rows[-2 * RECENT:-RECENT]
    mean = lambda key, part=recent: finite_mean([float(r.get(key, np.nan)) for r in part])
    rate, rate_before = mean("intervention_rate"), mean("intervention_rate", before)
    succeeded = [r for r in recent if r.get("success")]   # only their Monte-Carlo return is the whole return
    gap = mean("q/episode", succeeded) - mean("return/mc", succeeded)
    checks = [
        (rate >= 0.2 and rate > 0.9 * rate_before, "the intervention rate is hardly falling "
         f"({rate_before:.0%} -> {rate:.0%}); usual causes: temperature_init above 0.01 (now "
         f"{cfg.temperature_init}), utd_ratio below 10 (now {cfg.utd_ratio}), no step penalty (reward_step "
         f"{cfg.reward_step}), too few demos"),
        (gap > 0.25 * cfg.reward_success, f"the critics overestimate: Q {gap:+.1f} above the discounted "
         f"return of successful episodes; usual causes: utd_ratio high for the data (now {cfg.utd_ratio}), "
         f"too few demos, lr too high (now {cfg.lr})"),
        (mean("entropy") > entropy_target + 1, "the policy stays more random than its target (entropy "
         f"{mean('entropy'):.1f} vs {entropy_target:.1f}, alpha {mean('alpha'):.3f}); usual cause: "
         f"temperature_init too high (now {cfg.temperature_init}; hil-serl 0.01), which alpha takes "
         "thousands of steps to undo"),
        (mean("action/saturated") > 0.3, f"{mean('action/saturated'):.0%} of the policy's motions are at the "
         f"+-1 bound: it shakes; usual causes: too much entropy (temperature_init {cfg.temperature_init}), "
         f"or a reward with no step penalty (reward_step {cfg.reward_step})"),
        (mean("gripper/flips") > 6, f"the gripper flips {mean('gripper/flips'):.1f} times an episode (a "
         f"grasp needs one); raise --grasp_penalty (now {cfg.grasp_penalty}) or record demos that close the "
         "gripper once"),
    ]
    return [text for bad, text in checks if bad]


def finite_mean(values):
    """The mean of the finite values; NaN when there are none (a log of an older version lacks the column)."""
    values = np.asarray(values, float)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


# --- curves -------------------------------------------------------------------------------------
PANELS = [("success", "success rate"), ("intervention_rate", "intervention rate"),
          ("return", "episode return"),
          ("length", "episode length"), (("q/online", "q/demo"), "Q: online (-), demo (--) batches"),
          (("q/episode", "return/mc"), "Q(s,a) (-) vs discounted return (--)"),
          ("entropy", "actor entropy (target: black)"),
          ("alpha", "temperature alpha"), ("action/saturated", "share of actions at the +-1 bound"),
          ("gripper/flips", "gripper flips per episode"),
          (("intervention/count", "intervention/mean_length"), "interventions: count (-), mean length (--)"),
          ("intervention/first_step", "steps before the first intervention")]


def write_log(path, rows):
    """A run's log.csv, one row per episode, rewritten after every episode (a few hundred rows at most)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, text.getvalue())


def plot_command(spec, entropy_target):
    """hilserl.py --plot RUN_A,RUN_B,out.png: the runs' curves side by side in out.png."""
    *folders, out_path = spec.split(",")
    if (not folders or not out_path.endswith(".png")
            or not all(os.path.exists(f"{f}/log.csv") for f in folders)):
        raise ValueError(f"--plot {spec}: takes run folders with a log.csv, then the PNG to write: "
                         "runs/A,runs/B,out.png")
    plot_runs(folders, out_path, entropy_target)


def plot_runs(folders, out_path, entropy_target=None):
    """Learning curves and diagnostics against environment steps, one colour per run folder, into one PNG.
    Every curve is the mean of the last 20 episodes."""
    import matplotlib
    matplotlib.use("Agg")   # no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 4, figsize=(17, 10))
    for colour, folder in enumerate(folders):
        with open(pathlib.Path(folder) / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        try:
            steps = [float(r["env_steps"]) for r in rows]
        except (KeyError, TypeError, ValueError):   # not hilserl.py's log
            steps = []
        if not steps:
            raise ValueError(f"{pathlib.Path(folder) / 'log.csv'}: no episode rows of hilserl.py's; "
                             "nothing to plot")
        for ax, (keys, title) in zip(axes.flat, PANELS):
            for key, style in zip((keys,) if isinstance(keys, str) else keys, ("-", "--")):
                values = [float(r.get(key) or "nan") for r in rows]
                smooth = [finite_mean(values[max(0, i - RECENT + 1):i + 1]) for i in range(len(values))]
                ax.plot(steps, smooth, style, color=f"C{colour}",
                        label=pathlib.Path(folder).name if style == "-" else None)
            ax.set(title=title, xlabel="environment steps")
    if entropy_target is not None:
        axes.flat[6].axhline(entropy_target, color="black", linewidth=1)
    axes.flat[7].set_yscale("log")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(f"{out_path}.tmp.png")
    plt.close(fig)
    os.replace(f"{out_path}.tmp.png", out_path)
