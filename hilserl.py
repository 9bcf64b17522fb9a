"""HIL-SERL on the SO-101: the SAC/RLPD update and the training loop. Run this file.

    python hilserl.py --demos data/demos.npz        train (on the simulated SO-101 without --port)
    python hilserl.py --resume runs/X               continue a run from its last checkpoint
    python hilserl.py --eval runs/X                 success rate of the learned policy, no learning
    python hilserl.py --plot runs/A,runs/B,out.png  learning curves of runs side by side

Reading order: the update (critic_step, actor_step, learn), a control step's batches (with
vision.FrameFeatures, the frozen camera backbone's features), the loop (train: set-up, one episode, its
bookkeeping; evaluate), the run folder (checkpoints, config, log, plots), main.
The update is RLPD's recipe (Ball et al. 2023) with HIL-SERL's choices (Luo et al. 2024):
every control step does `utd_ratio` critic updates, each on a fresh batch that is half demo
and half online data, then one actor and one temperature update. This file is the plain eager
update; fast.py makes the same functions fast (--compile) and is tested against them.
"""

import dataclasses
import functools
import json
import os
import pathlib
import pickle
import sys
import time

import numpy as np
import torch

from buffer import ReplayBuffer, load_episodes, lock_run_folder, sample_batches, write_atomically
from classifier import load_classifier
from config import Config, load_run_config, warnings_for
from diagnostics import (diagnose, episode_diagnostics, episode_q, episode_video, plot_command, plot_runs,
                         write_log)
from networks import DEVICE_CAN, Agent, pick_device
from robot import ACT_DIM, EE_DIM, BusError, RobotError
from teleop import EmergencyStop, StatusLine, make_env, make_teleop, record_demos, wait_for_start
from vision import SHIFTED_COPIES, FrameFeatures, load_resnet10, random_shift, resnet10_weights


TARGET_ENTROPY = -ACT_DIM / 2   # -|A|/2 = -2, the gripper one action dimension (hil-serl's hybrid agent)


def make_optimizers(agent, cfg):
    """Adam everywhere (hil-serl), one for everything the critic losses train. fused: one kernel
    updates every parameter of the list, where the default makes several passes over them."""
    fused = "fused_adam" in DEVICE_CAN[agent.log_alpha.device.type]   # networks.py: what each device can do
    adam = functools.partial(torch.optim.Adam, lr=cfg.lr, fused=fused)
    return {"critic": adam(agent.critic_params.values()), "actor": adam(agent.actor.parameters()),
            "temperature": adam([agent.log_alpha])}


# --- the update ---------------------------------------------------------------------------
def critic_losses(agent, batch, next_act, discount):
    """Critic and grasp-critic losses on a batch; next_act ~ pi(.|s') drawn beforehand, or None."""
    with torch.no_grad():
        z_next = agent.encoder(batch["next_obs"])                                  # (B, F)
        if next_act is None:   # with cameras the actor reads the critic encoder, which every update changes
            next_act, _ = agent.actor(batch["next_obs"], agent.image_features(z_next))   # (B, 3)
        z_next_target = agent.target["encoder"](batch["next_obs"])                # (B, F)
        q_next = agent.target["critic"](z_next_target, next_act).min(0).values     # (B,) clipped double-Q
        not_terminated = 1.0 - batch["terminated"]             # a truncated step still bootstraps
        # PAPER: y = r + gamma (1 - terminated) min_j Qbar_j(s', a'), no entropy term (hil-serl sac.py)
        y = batch["rew"] + discount * not_terminated * q_next                      # (B,)
        # PAPER: Double DQN (van Hasselt et al. 2016): the online net picks a*, the target net values it;
        # the gripper-flip penalty is added to the grasp critic's reward only (hil-serl)
        best_next = agent.grasp_critic(z_next).argmax(-1, keepdim=True)            # (B, 1)
        g_next = agent.target["grasp_critic"](z_next_target).gather(-1, best_next).squeeze(-1)  # (B,)
        y_grasp = batch["rew"] + batch["grasp_penalty"] + discount * not_terminated * g_next
    z = agent.encoder(batch["obs"])                                                # (B, F)
    q = agent.critic(z, batch["act"][:, :EE_DIM])                                  # (E, B)
    critic_loss = (q - y).pow(2).mean()                  # mean over ensemble and batch (hil-serl)
    grasp_class = batch["act"][:, EE_DIM].round().long() + 1                       # -1/0/1 -> 0/1/2
    g = agent.grasp_critic(z).gather(-1, grasp_class.unsqueeze(-1)).squeeze(-1)    # (B,)
    grasp_loss = (g - y_grasp).pow(2).mean()
    return critic_loss, grasp_loss, q.detach().mean(0)                            # (B,) for the log


def critic_step(agent, optimizer, batch, next_act, discount, tau):
    """One critic and grasp-critic update: Adam on the summed losses (their parameters are disjoint
    but for the shared encoder, so one gradient serves both), then the target networks."""
    critic_loss, grasp_loss, q = critic_losses(agent, batch, next_act, discount)
    optimizer.zero_grad(set_to_none=True)
    (critic_loss + grasp_loss).backward()
    optimizer.step()
    # PAPER: soft target update thetabar <- (1 - tau) thetabar + tau theta (SAC; hil-serl averages all)
    with torch.no_grad():   # one call lerps every tensor of the list (the optimizer's, in the targets' order)
        torch._foreach_lerp_(agent.target_params, optimizer.param_groups[0]["params"], tau)
    half = len(q) // 2   # a batch's demo rows come first
    return {"loss/critic": critic_loss.detach(), "loss/grasp_critic": grasp_loss.detach(),
            "q/demo": q[:half].mean(), "q/online": q[half:].mean()}


def actor_losses(agent, obs, entropy_target):
    """The actor and temperature losses (SAC, Haarnoja et al. 2018, eqs. 7 and 18), the entropy and alpha."""
    with torch.no_grad():
        z = agent.encoder(obs)                                                     # (B, F)
    act, log_prob = agent.actor(obs, agent.image_features(z))   # image features detached (hil-serl)
    q = agent.critic(z, act).mean(0)                  # (B,) mean of the critics, not the min (hil-serl)
    alpha = agent.log_alpha.exp()
    # PAPER: J_pi = E[alpha log pi(a|s) - Q(s, a)], a ~ pi reparameterised (SAC eq. 7)
    actor_loss = (alpha.detach() * log_prob - q).mean()
    # PAPER: J_alpha = alpha (H - Htarget) with H = -E[log pi]: alpha falls while the policy is more
    # random than the target (hil-serl's Lagrange form of SAC eq. 18; H from this batch, as in RLPD)
    entropy = -log_prob.detach().mean()
    temperature_loss = alpha * (entropy - entropy_target)
    return actor_loss, temperature_loss, {"entropy": entropy, "alpha": alpha.detach()}


def actor_step(agent, actor_optimizer, temperature_optimizer, obs, entropy_target):
    """One actor and one temperature update."""
    actor_loss, temperature_loss, stats = actor_losses(agent, obs, entropy_target)
    for loss, optimizer in ((actor_loss, actor_optimizer), (temperature_loss, temperature_optimizer)):
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=optimizer.param_groups[0]["params"])   # its own parameters, not the critics'
        optimizer.step()
    return {"loss/actor": actor_loss.detach(), "loss/temperature": temperature_loss.detach(), **stats}


def next_actions(actor, next_obs):
    """a' ~ pi(.|s') for the critic targets of a whole control step (no cameras)."""
    return actor(next_obs)[0]


def learn(agent, optimizers, cfg, batches, critic_update=critic_step, actor_update=actor_step,
          draw_next_actions=next_actions):
    """A whole control step's learning: utd_ratio critic updates, then one actor update (RLPD).

    batches: tensors shaped (utd_ratio, B, ...) on the agent's device. Returns detached tensors;
    nothing here waits for the GPU (no .item()). fast.py passes compiled forms of the three functions.
    """
    if cfg.augment and agent.image_encoder == "small":   # DrQ: each frame of obs, next_obs shifted on its own
        for group in ("obs", "next_obs"):
            batches = {**batches, group: {k: random_shift(v) if k in agent.encoder.images else v
                                          for k, v in batches[group].items()}}
    next_act = None     # with cameras, critic_losses draws a' from the actor after each encoder update
    if not agent.encoder.images:
        with torch.no_grad():   # the actor does not change during the critic updates: draw all a' at once
            next_act = draw_next_actions(agent.actor, batches["next_obs"])         # (U, B, 3)
    for i in range(len(batches["act"])):
        batch = index_batch(batches, i)
        stats = critic_update(agent, optimizers["critic"], batch, None if next_act is None else next_act[i],
                              cfg.discount, cfg.tau)
    return {**stats, **actor_update(agent, optimizers["actor"], optimizers["temperature"], batch["obs"],
                                    TARGET_ENTROPY)}


# --- a control step's batches -------------------------------------------------------------------
def index_batch(batches, i):
    return {k: index_batch(v, i) if isinstance(v, dict) else v[i] for k, v in batches.items()}


def to_device(arrays, device):
    """numpy batches from `sample_batches` -> nested dict of tensors ("obs/state" -> ["obs"]["state"])."""
    out = {"obs": {}, "next_obs": {}}
    for key, value in arrays.items():
        t = torch.from_numpy(value)
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)   # pinned: the copy overlaps the updates
        group, _, name = key.rpartition("/")
        (out[group] if group else out)[name] = t.float() if t.dtype == torch.bool else t
    return out


def control_step_batches(demo, online, cfg, rng, device, demo_features=None, online_features=None):
    """One control step's utd_ratio batches on the device, half demo, half online (features, not frames)."""
    cached = online_features is not None
    batches = to_device(sample_batches(demo, online, cfg.utd_ratio, cfg.batch_size, rng, not cached), device)
    if cached:
        slots = batches.pop("slot")                                                # (U, B)
        half = slots.shape[1] // 2
        halves = ((demo_features, slots[:, :half]), (online_features, slots[:, half:]))
        for key in online_features.table:
            for group, offset in (("obs", 0), ("next_obs", 1)):   # next_obs's frame is in the next slot
                rows = [f.read(key, (s + offset) % f.buffer.capacity, torch.randint_like(s, f.copies))
                        for f, s in halves]                                    # a row: any copy of its frame
                batches[group][key] = torch.cat(rows, dim=1)                           # (U, B, 512, h, w)
    return batches


# --- the loop -----------------------------------------------------------------------------------
class NonFiniteUpdate(ArithmeticError):
    """A loss or Q value of the update is NaN or infinite: the agent is poisoned."""


def image_shapes(obs):
    return {k: v.shape for k, v in obs.items() if v.dtype == np.uint8}   # {camera: (H, W, 3)}, or {}


def obs_to_tensors(obs, device):
    return {k: torch.as_tensor(v, device=device).unsqueeze(0) for k, v in obs.items()}   # (1, ...)


@dataclasses.dataclass
class Run:
    """What a training run carries from one episode to the next."""
    cfg: Config
    folder: pathlib.Path
    device: torch.device
    agent: Agent
    optimizers: dict
    learn_step: object       # batches -> stats: learn, or fast.py's compiled form of it (--compile)
    demo: ReplayBuffer
    online: ReplayBuffer
    demo_features: object    # FrameFeatures of each buffer with the frozen ResNet-10, else None
    online_features: object
    progress: dict           # episode, env_steps, updates: what a checkpoint restores
    rows: list               # log.csv
    rng: np.random.Generator
    warned_slow: bool = False

    def batches(self):
        return control_step_batches(self.demo, self.online, self.cfg, self.rng, self.device,
                                    self.demo_features, self.online_features)


def start_run(cfg, obs, folder):
    """Set-up: the agent, its optimizers, both buffers and the log, new or from the folder's checkpoint."""
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    demo = ReplayBuffer(cfg.demo_capacity, obs, ACT_DIM)
    online = ReplayBuffer(cfg.replay_capacity, obs, ACT_DIM)
    agent = Agent(len(obs["state"]), cfg, image_shapes(obs)).to(device)
    optimizers = make_optimizers(agent, cfg)
    progress, rows = {"episode": 0, "env_steps": 0, "updates": 0}, []
    if cfg.resume:
        progress = load_checkpoint(folder, agent, optimizers)
        demo.load(folder / "demo.npz")
        rows = load_episodes(folder / "episodes", online, demo, progress["episode"])   # those after it too
        progress.update({k: rows[-1][k] if rows else 0 for k in ("episode", "env_steps")})   # a row each
        print(f"resumed {folder} at episode {progress['episode']}, {progress['env_steps']} steps")
    else:
        if agent.backbone is not None:
            load_resnet10(agent.backbone, resnet10_weights(cfg))
        demo.load(cfg.demos)
        if not len(demo):
            raise ValueError(f"{cfg.demos} holds no transitions; record demos into another file")
        print(f"{cfg.demos}: {demo.num_episodes} demo episodes, {len(demo)} transitions")
    hints = [f"diagnosis: {hint}" for hint in diagnose(rows, cfg, TARGET_ENTROPY)]   # a resumed run's log
    for line in warnings_for(cfg, None if cfg.resume else demo.num_episodes) + hints:
        print(line)
    copies = SHIFTED_COPIES if cfg.augment else 1
    features = [FrameFeatures(b, agent.backbone, device, copies) if agent.backbone is not None else None
                for b in (demo, online)]
    run = Run(cfg, folder, device, agent, optimizers, functools.partial(learn, agent, optimizers, cfg),
              demo, online, *features, progress, rows, np.random.default_rng(cfg.seed))
    if cfg.compile:   # fast.py imports this file: only a run that asks for it reads it
        import fast
        demo_batches = control_step_batches(demo, demo, cfg, run.rng, device, features[0], features[0])
        run.learn_step = fast.Learner(agent, optimizers, cfg, demo_batches)
    return run


def learn_now(run, out):
    """utd_ratio updates once there is data enough: stats and seconds into `out`. A non-finite one stops."""
    begin = time.perf_counter()
    if len(run.online) >= run.cfg.training_starts:
        out["stats"] = stats = run.learn_step(run.batches())
        run.progress["updates"] += run.cfg.utd_ratio
        if not torch.isfinite(torch.stack(list(stats.values()))).all():   # SYNC POINT: once a step
            name, value = next((k, v.item()) for k, v in stats.items() if not torch.isfinite(v))
            raise NonFiniteUpdate(f"the update's {name} is {value} in episode {run.progress['episode'] + 1}")
    out["seconds"] = time.perf_counter() - begin


def run_episode(run, env, teleop, obs, status, writer=None, picture=None):
    """One episode: read, act (policy or human), write the goal, learn while the arm moves, store -> row,
    events, transitions; and its video when there is a writer (diagnostics.episode_video)."""
    cfg, agent = run.cfg, run.agent
    ret, human_steps, timings, stats, features, policy_acts, slots = 0.0, 0, [], {}, {}, [], []
    episode = ReplayBuffer(cfg.episode_steps + 2, obs, ACT_DIM)   # its transitions, for the run folder
    updates_before, start = run.progress["updates"], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        observed = {**obs_to_tensors(obs, run.device), **features}   # with the frames' cached features
        policy_act = agent.act(observed)[0].cpu().numpy()   # SYNC POINT
        act, intervened, events = teleop.poll(policy_act, obs)
        if "success" in events:
            env.world.succeeded = True          # the human says the task is done (real robot)
        shown = picture(obs) if writer else None
        t1, learned = time.perf_counter(), {"stats": stats}   # updates run in the tick's wait, the arm moving
        next_obs, rew, terminated, truncated, info = env.step(act, lambda: learn_now(run, learned))
        truncated = truncated or bool(events & {"failure", "rerecord", "quit"})
        stats, update_s = learned["stats"], learned["seconds"]
        transition = (obs, act, rew, next_obs, terminated, truncated, intervened, info["grasp_penalty"])
        slot = run.online.add(*transition)
        episode.add(*transition)
        policy_acts.append(policy_act)
        slots.append(slot)
        if writer:
            writer.add(shown, len(slots), act, intervened, info["success"])
        features = run.online_features.add(slot) if run.online_features else {}   # next_obs's, to act next
        if intervened:                          # a human correction is a demonstration too (hil-serl)
            slot = run.demo.add(*transition)
            if run.demo_features:
                run.demo_features.add(slot)
        timings.append((t1 - t0, time.perf_counter() - t1 - update_s, update_s, info["io_s"]))
        if info["overrun_s"] > 0 and len(timings) >= 10 and not run.warned_slow:   # late for the arm's tick
            run.warned_slow = True
            act_ms, _, update_ms, io_ms = (1e3 * np.mean(x) for x in zip(*timings))
            slowest = max((act_ms, "act: train on a GPU, or lower --image_size"),
                          (io_ms, "robot I/O (bus, cameras): check --baudrate, --bus_latency_s, the cameras"),
                          (update_ms, "updates: lower --utd_ratio or train on a GPU"))[1]
            print(f"warning: the loop cannot keep {cfg.control_hz} Hz: act {act_ms:.0f} ms, robot I/O "
                  f"{io_ms:.0f} ms, {cfg.utd_ratio} updates {update_ms:.0f} ms per step; the most is "
                  f"{slowest}")
        status.count(intervened, rew)
        obs, ret = next_obs, ret + rew
        human_steps += intervened
        run.progress["env_steps"] += 1
        if terminated or truncated:
            break
    if writer:
        writer.close()
    run.progress["episode"] += 1
    length, seconds = len(timings), time.perf_counter() - start
    row = {"episode": run.progress["episode"], "env_steps": run.progress["env_steps"], "return": ret,
           "length": length, "success": float(terminated), "intervention_rate": human_steps / length,
           "updates_per_s": (run.progress["updates"] - updates_before) / seconds,
           **{k: v.item() for k, v in stats.items()}, **env.health,   # SYNC POINT: logging; servos' health
           **dict(zip(("time/act_ms", "time/robot_ms", "time/update_ms"), 1e3 * np.mean(timings, 0)[:3]))}
    q = episode_q(agent, episode, run.online_features, slots)
    row.update(episode_diagnostics(episode, np.array(policy_acts), q, cfg.discount))
    return row, events, episode


def end_episode(run, row, episode, status):
    """The episode's bookkeeping: its file, the log, the operator's line, the diagnosis, a checkpoint."""
    path = run.folder / "episodes" / f"episode_{row['episode']:06d}.npz"
    episode.save(path, {"log/" + k: np.array(v) for k, v in row.items()})
    run.rows.append(row)
    write_log(run.folder / "log.csv", run.rows)
    status.end_episode(row["success"], f"  |  {row['env_steps']} steps, {row['updates_per_s']:.0f} updates/s")
    for hint in diagnose(run.rows, run.cfg, TARGET_ENTROPY) if row["episode"] % 20 == 0 else []:
        print("diagnosis: " + hint)
    if row["episode"] % run.cfg.checkpoint_every == 0:
        save_checkpoint(run)


def train(cfg, env, teleop, folder):
    obs = env.reset(seed=cfg.seed)
    run = start_run(cfg, obs, folder)
    if not cfg.resume:   # what every resume starts from: the demos as they were, and the untrained agent
        run.demo.save(folder / "demo.npz")
        save_checkpoint(run)
    write_atomically(folder / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))   # all loaded
    status = StatusLine()
    status.episode = run.progress["episode"] + 1
    try:
        while not cfg.max_env_steps or run.progress["env_steps"] < cfg.max_env_steps:
            obs = env.reset() if run.progress["episode"] or cfg.resume else obs
            teleop.reset()
            if cfg.port and (obs := wait_for_start(teleop, env, obs)) is None:   # the human resets the scene
                break
            number = run.progress["episode"] + 1   # a video every video_every episodes, in videos/
            filmed = cfg.video_every and number % cfg.video_every == 0
            path = folder / "videos" / f"episode_{number:06d}.webm"
            video = episode_video(path, env, obs, cfg.control_hz) if filmed else (None, None)
            row, events, episode = run_episode(run, env, teleop, obs, status, *video)
            end_episode(run, row, episode, status)
            if "quit" in events:
                break
    except NonFiniteUpdate as error:   # a poisoned agent is not saved: the last checkpoint stays as it was
        raise SystemExit(f"error: {error}; training stopped and saved nothing since the last checkpoint "
                         "(usual causes: --lr too high, rewards far out of scale)") from None
    except BaseException:              # Ctrl-C, SIGTERM, a bus error: save, losing at most this episode
        try:
            env.arm.close()            # SAFETY: torque off first: saving takes seconds
        finally:                       # and save even when it fails: a pulled cable fails both the run and it
            save_checkpoint(run)
        raise
    env.arm.close()
    save_checkpoint(run)
    return run.rows


def evaluate(cfg, env, folder, teleop=None):
    """The deterministic policy, no learning, no interventions: success rate and mean length. On a real
    arm `teleop` brings the human's buttons: start (once the scene is reset), success, failure, e-stop."""
    device = pick_device(cfg)
    obs = env.reset(seed=cfg.seed + 10_000)               # other cube positions than in training
    agent = Agent(len(obs["state"]), cfg, image_shapes(obs)).to(device)
    load_checkpoint(folder, agent)
    episodes = []   # (success, length)
    for episode in range(cfg.eval_episodes):
        obs = env.reset() if episode else obs
        if teleop is not None and (obs := wait_for_start(teleop, env, obs)) is None:
            break
        path = folder / "videos" / f"eval_{episode + 1:03d}.webm"
        writer, picture = episode_video(path, env, obs, cfg.control_hz) if cfg.video_every else (None, None)
        for length in range(1, cfg.episode_steps + 1):
            act = agent.act(obs_to_tensors(obs, device), deterministic=True)[0].cpu().numpy()   # SYNC POINT
            events = teleop.read(obs)[2] if teleop is not None else set()   # the e-stop raises EmergencyStop
            if "success" in events:
                env.world.succeeded = True
            shown = picture(obs) if writer else None
            obs, _, terminated, truncated, _ = env.step(act)
            if writer:
                writer.add(shown, length, act, False, terminated)
            if terminated or truncated or "failure" in events:
                break
        if writer:
            writer.close()
        episodes.append((terminated, length))
    success, length = np.mean(episodes, axis=0) if episodes else (0.0, 0.0)
    print(f"eval {folder}: success {success:.0%} over {len(episodes)} episodes, "
          f"mean length {length:.1f} steps")
    return float(success), float(length)


# --- the run folder: config.json, demo.npz, episodes/, checkpoint.pt, log.csv, curves.png ------------
def save_checkpoint(run):
    """The agent, its optimizers and counters, atomically, then the curves. The buffers need no saving:
    a resume rebuilds them from demo.npz and the episode files."""
    state = {"agent": run.agent.state_dict(), "progress": run.progress,
             "image_encoder": run.agent.image_encoder,
             "optimizers": {k: o.state_dict() for k, o in run.optimizers.items()}}
    try:
        torch.save(state, run.folder / "checkpoint.pt.tmp")
        os.replace(run.folder / "checkpoint.pt.tmp", run.folder / "checkpoint.pt")     # atomic
    except (OSError, RuntimeError) as error:   # a full disk (torch raises RuntimeError): the last one is kept
        (run.folder / "checkpoint.pt.tmp").unlink(missing_ok=True)
        size_mb = sum(t.nbytes for t in state["agent"].values()) * 3 / 1e6   # weights and Adam's 2 moments
        raise OSError(f"{run.folder / 'checkpoint.pt'}: not written ({error}); it needs about {size_mb:.0f} "
                      f"MB: free disk space, then --resume {run.folder} (the last one is kept)") from None
    if run.rows:
        plot_runs([run.folder], run.folder / "curves.png", TARGET_ENTROPY)


def load_checkpoint(folder, agent, optimizers=None):
    path = folder / "checkpoint.pt"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; is {folder} a run folder of hilserl.py?")
    try:   # weights only, as torch does by default: never unpickle what this project did not write
        state = torch.load(path, map_location=next(agent.parameters()).device)
        agent_state, progress = state["agent"], state["progress"]
        trained_with = state.get("image_encoder", agent.image_encoder)   # older checkpoints do not say
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError, IndexError):
        raise SystemExit(f"error: {path}: not a readable checkpoint (truncated, corrupt or not written by "
                         "hilserl.py)") from None
    if trained_with and trained_with != agent.image_encoder:
        raise SystemExit(f"error: {path} was trained with --encoder {trained_with}; pass --encoder "
                         f"{trained_with}, or start a new run for the other encoder")
    try:
        agent.load_state_dict(agent_state)
    except RuntimeError as error:   # other network sizes, cameras or state than this run's
        why = str(error).splitlines()[-1].strip()
        raise SystemExit(f"error: {path} does not fit the network these settings make ({why}); resume and "
                         f"evaluate with the settings in {folder / 'config.json'}") from None
    for name, optimizer in (optimizers or {}).items():
        try:   # an older hilserl.py's checkpoint holds its own Adam's moments ("opts"): evaluate it only
            optimizer.load_state_dict(state["optimizers"][name])
        except (KeyError, ValueError) as error:
            raise SystemExit(f"error: {path}: the {name} optimizer's state does not fit this agent "
                             f"({error!r}); evaluate it (--eval {folder}) or start a new run") from None
    return progress


def main():
    cfg = load_run_config(sys.argv[1:])
    pick_device(cfg)   # a device that is not there: one line now, not a traceback later
    folder = pathlib.Path(cfg.eval or cfg.resume or cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S"))
    try:   # what a user can fix (a file, a setting, the arm's power or cables) is one line that says what
        if cfg.plot:
            return plot_command(cfg.plot, TARGET_ENTROPY)
        new_run = not (cfg.eval or cfg.resume)
        if new_run and folder.exists() and any(folder.iterdir()):   # never write over a run
            raise ValueError(f"{folder} already holds a run; continue it with --resume {folder} or pick "
                             "another --run_dir")
        if new_run and not os.path.exists(cfg.demos):
            if cfg.port:
                raise ValueError(f"{cfg.demos} does not exist; record demos first: "
                                 f"python teleop.py record --port {cfg.port} --demos {cfg.demos}")
            print(f"{cfg.demos} does not exist: the scripted expert records {cfg.demo_episodes} demos first")
            record_demos(cfg, cfg.demos, cfg.demo_episodes)
        with make_env(cfg, cfg.seed + 10_000 * bool(cfg.eval)) as env:   # SAFETY: torque off however it ends
            if cfg.classifier:
                env.classifier = load_classifier(cfg, pick_device(cfg)).success
            if cfg.eval:   # on a real arm, the human's buttons still start, end and stop episodes
                return evaluate(cfg, env, folder, make_teleop(cfg, env) if cfg.port else None)
            teleop = make_teleop(cfg, env)   # before the folder: a device that is not there leaves none
            folder.mkdir(parents=True, exist_ok=True)
            with lock_run_folder(folder):
                print(f"run folder: {folder}")
                train(cfg, env, teleop, folder)
    except (ValueError, OSError, RobotError, EmergencyStop) as error:
        lost = isinstance(error, BusError) and not cfg.eval and (folder / "checkpoint.pt").exists()   # saved
        raise SystemExit(f"error: {error}" + (f"; then continue with: python hilserl.py --resume {folder}"
                                              if lost else "")) from None
    except KeyboardInterrupt:   # Ctrl-C: train() has saved the checkpoint on its way out
        resume = f"; continue with: python hilserl.py --resume {folder}"
        raise SystemExit("stopped" + ("" if cfg.eval else resume)) from None


if __name__ == "__main__":
    main()
