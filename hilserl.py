"""HIL-SERL on the SO-101: the SAC/RLPD update and the training loop. Run this file.

    python hilserl.py --demos data/demos.npz        train (on the simulated SO-101 without --port)
    python hilserl.py --resume runs/X               continue a run from its last checkpoint
    python hilserl.py --eval runs/X                 success rate of the learned policy, no learning
    python hilserl.py --bench                       time one control step's learning
    python hilserl.py --bench --use_images true     the same with two 128x128 cameras
    python hilserl.py --train_classifier data/frames.npz --classifier data/classifier.pt
                                                    train the reward classifier on labelled frames

Reading order: the update (Adam, critic_step, actor_step, learn), camera features (FrameFeatures),
the loop (train, evaluate, and the run folder's checkpoints, log and plots), the reward
classifier's training, then the benchmark.
The update is RLPD's recipe (Ball et al. 2023) with HIL-SERL's choices (Luo et al. 2024):
every control step does `utd_ratio` critic updates, each on a fresh batch that is half demo
and half online data, then one actor and one temperature update.
"""

import copy
import csv
import ctypes
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time

import numpy as np
import torch

from buffer import ReplayBuffer, sample_batches
from config import Config, load_config, warnings_for
from networks import (EE_DIM, Actor, Agent, Encoder, GraspCritic, RewardClassifier, load_resnet10, mlp, random_shift,
                      resnet10_weights)
from robot import BusError, ServoError
from teleop import ACT_DIM, EmergencyStop, OperatorWindow, make_env, make_teleop, record_demos, wait_for_start

assert ACT_DIM == EE_DIM + 1, "the action is the EE delta x, y, z and the gripper command"


def target_entropy():
    """-|A|/2 with the gripper counted as one action dimension (hil-serl's hybrid agent): -2."""
    return -ACT_DIM / 2


class Adam:
    """Adam (Kingma & Ba 2015), updating a list of parameters in place from gradients it is given.

    Written out instead of torch.optim.Adam so that a whole critic update, Adam included, is a
    function of tensors that torch.compile can turn into one graph (--compile). The `_foreach_`
    ops each do one operation on every tensor of a list in one call.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]            # first moments
        self.v = [torch.zeros_like(p) for p in self.params]            # second moments
        self.t = torch.zeros((), device=self.params[0].device)         # steps; a tensor, so counting never recompiles

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        # PAPER: Kingma & Ba 2015, Algorithm 1: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
        # theta <- theta - lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
        torch._foreach_lerp_(self.m, grads, 1 - self.beta1)
        torch._foreach_mul_(self.v, self.beta2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - self.beta2)
        m_hat = torch._foreach_div(self.m, 1 - self.beta1 ** self.t)
        v_hat = torch._foreach_div(self.v, 1 - self.beta2 ** self.t)
        torch._foreach_addcdiv_(self.params, m_hat, torch._foreach_add(torch._foreach_sqrt(v_hat), self.eps),
                                value=-self.lr)

    def state_dict(self):
        return {"m": self.m, "v": self.v, "t": self.t}

    @torch.no_grad()
    def load_state_dict(self, state):
        torch._foreach_copy_([*self.m, *self.v, self.t], [*state["m"], *state["v"], state["t"]])


def make_optimizers(agent, cfg):
    """Adam everywhere (hil-serl). One optimizer for everything the critic losses train."""
    return {"critic": Adam(agent.critic_params.values(), cfg.lr), "actor": Adam(agent.actor.parameters(), cfg.lr),
            "temperature": Adam([agent.log_alpha], cfg.lr)}


# --- the update ---------------------------------------------------------------------------
def critic_losses(agent, b, next_act, discount):
    """Critic and grasp-critic losses on batch b; next_act ~ pi(.|s') drawn beforehand, or None."""
    with torch.no_grad():
        z_next = agent.encoder(b["next_obs"])                                      # (B, F)
        if next_act is None:   # with cameras the actor reads the critic encoder, which every update changes
            next_act, _ = agent.actor(b["next_obs"], agent.image_features(z_next))  # (B, 3)
        z_next_target = agent.target["encoder"](b["next_obs"])                    # (B, F)
        q_next = agent.target["critic"](z_next_target, next_act).min(0).values     # (B,) clipped double-Q
        not_terminated = 1.0 - b["terminated"]                 # a truncated step still bootstraps
        # PAPER: y = r + gamma (1 - terminated) min_j Qbar_j(s', a'), no entropy term (hil-serl sac.py)
        y = b["rew"] + discount * not_terminated * q_next                          # (B,)
        # PAPER: Double DQN (van Hasselt et al. 2016): the online net picks a*, the target net values it;
        # the gripper-flip penalty is added to the grasp critic's reward only (hil-serl)
        best_next = agent.grasp_critic(z_next).argmax(-1, keepdim=True)            # (B, 1)
        g_next = agent.target["grasp_critic"](z_next_target).gather(-1, best_next).squeeze(-1)  # (B,)
        y_grasp = b["rew"] + b["grasp_penalty"] + discount * not_terminated * g_next
    z = agent.encoder(b["obs"])                                                    # (B, F)
    q = agent.critic(z, b["act"][:, :EE_DIM])                                      # (E, B)
    critic_loss = (q - y).pow(2).mean()                  # mean over ensemble and batch (hil-serl)
    grasp_class = b["act"][:, EE_DIM].round().long() + 1                           # -1/0/1 -> 0/1/2
    g = agent.grasp_critic(z).gather(-1, grasp_class.unsqueeze(-1)).squeeze(-1)    # (B,)
    grasp_loss = (g - y_grasp).pow(2).mean()
    return critic_loss, grasp_loss, q.detach().mean()


def critic_gradients(agent, b, next_act, discount):
    """({name: gradient} of the critic plus grasp-critic loss, (the two losses, the mean Q)).

    One gradient for both losses: their parameters are disjoint except the shared encoder.
    """
    params = agent.critic_params
    if torch.compiler.is_compiling():
        # torch.compile traces torch.func.grad, a function of the parameters, where autograd.grad
        # would split the compiled update in two; functional_call runs the losses on `params`
        def total_loss(params):
            losses = torch.func.functional_call(agent, params, (critic_losses, b, next_act, discount))
            return losses[0] + losses[1], losses
        return torch.func.grad(total_loss, has_aux=True)(params)
    with torch.enable_grad():   # eager: autograd, which is faster here than torch.func's wrapped tensors
        losses = critic_losses(agent, b, next_act, discount)
        return dict(zip(params, torch.autograd.grad(losses[0] + losses[1], list(params.values())))), losses


def critic_step(agent, adam, b, next_act, discount, tau):
    """One critic and grasp-critic update on batch b: gradients, Adam, then the target networks."""
    grads, (critic_loss, grasp_loss, q_mean) = critic_gradients(agent, b, next_act, discount)
    adam.step(list(grads.values()))
    # PAPER: soft target update thetabar <- (1 - tau) thetabar + tau theta (SAC; hil-serl averages all)
    with torch.no_grad():   # else autograd records every update and the targets grow an endless history
        torch._foreach_lerp_(agent.target_params, adam.params, tau)
    return {"loss/critic": critic_loss.detach(), "loss/grasp_critic": grasp_loss.detach(), "q/mean": q_mean}


def next_actions(actor, next_obs):
    """a' ~ pi(.|s') for the critic targets of a whole control step (no cameras)."""
    return actor(next_obs)[0]


# --compile: the critic update and the next-action draw through torch.compile, which makes each
# one graph and fuses its many small elementwise kernels (compiling takes ~30 s). The update runs
# under no_grad: torch.func.grad makes its own gradients, and the graph needs no autograd around it.
compiled_critic_step = torch.compile(torch.no_grad()(critic_step))
compiled_next_actions = torch.compile(next_actions)


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


def actor_step(agent, actor_adam, temperature_adam, obs, entropy_target):
    """One actor and one temperature update."""
    actor_loss, temperature_loss, info = actor_losses(agent, obs, entropy_target)
    actor_adam.step(torch.autograd.grad(actor_loss, actor_adam.params))   # the critics are not trained here
    temperature_adam.step(torch.autograd.grad(temperature_loss, temperature_adam.params))
    return {"loss/actor": actor_loss.detach(), "loss/temperature": temperature_loss.detach(), **info}


def learn(agent, opts, batches, cfg):
    """A whole control step's learning: utd_ratio critic updates, then one actor update (RLPD).

    batches: tensors on the agent's device shaped (utd_ratio, B, ...), from `to_device`.
    Returns detached tensors; nothing here waits for the GPU (no .item()).
    """
    if agent.augment:   # DrQ: every frame of obs and of next_obs shifted on its own
        for group in ("obs", "next_obs"):
            batches[group] = {k: random_shift(v) if k in agent.encoder.images else v for k, v in batches[group].items()}
    next_act = None     # with cameras, critic_losses draws a' from the actor after each encoder update
    if not agent.encoder.images:
        draw = compiled_next_actions if cfg.compile else next_actions
        with torch.no_grad():   # the actor does not change during the critic updates: draw all a' at once
            next_act = draw(agent.actor, batches["next_obs"])                      # (U, B, 3)
    step = compiled_critic_step if cfg.compile else critic_step
    for i in range(batches["act"].shape[0]):
        b = index_batch(batches, i)
        info = step(agent, opts["critic"], b, None if next_act is None else next_act[i], cfg.discount, cfg.tau)
    info.update(actor_step(agent, opts["actor"], opts["temperature"], b["obs"], target_entropy()))
    return info


def index_batch(batches, i):
    return {k: index_batch(v, i) if isinstance(v, dict) else v[i] for k, v in batches.items()}


def to_device(arrays, device):
    """numpy batches from `sample_batches` -> nested dict of tensors, in one copy per array."""
    out = {"obs": {}, "next_obs": {}}
    for key, value in arrays.items():
        t = torch.from_numpy(value)
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)   # pinned: the copy overlaps the updates
        t = t.float() if t.dtype == torch.bool else t
        if "/" in key:
            group, name = key.split("/")
            out[group][name] = t
        else:
            out[key] = t
    return out


# --- camera features: the frozen backbone runs once per stored frame --------------------------------
class FrameFeatures:
    """The frozen ResNet-10's features of every frame in a replay buffer, kept on the device.

    Row i of `table[camera]` holds the features of the frame in the buffer's slot i. `add` stores
    a transition and computes the features of the frames it wrote, so the backbone runs once per
    frame, and the updates only index these rows (at 20 updates of batch 256 and two
    cameras, the backbone in every update would cost ~12 TFLOP per control step). float16 halves
    memory and copies. The price: no random-shift augmentation on this path (the features are fixed).
    """

    def __init__(self, buffer, backbone, device):
        self.buffer, self.backbone = buffer, backbone
        frame = torch.zeros(1, *buffer.arrays[buffer.image_keys[0]].shape[1:], dtype=torch.uint8, device=device)
        shape = backbone(frame).shape[1:]                                          # (512, h, w)
        self.table = {k: torch.zeros(buffer.capacity, *shape, dtype=torch.float16, device=device)
                      for k in buffer.image_keys}
        self.next_slot = None   # where the frame of the next add's obs already is, while an episode runs
        self.compute(np.arange(buffer.size))   # frames loaded from a file

    def compute(self, slots, chunk=256):
        for start in range(0, len(slots), chunk):
            s = slots[start:start + chunk]
            for key, table in self.table.items():
                frames = torch.from_numpy(self.buffer.arrays[key][s]).to(table.device)   # (n, H, W, 3)
                table[torch.as_tensor(s, device=table.device)] = self.backbone(frames).half()

    def add(self, *transition):
        """buffer.add, then the features of its new frames: next_obs's, and obs's when an episode starts.

        Returns next_obs's features {camera: (1, 512, h, w)}, for the policy's next action.
        """
        i = self.buffer.add(*transition)
        j = (i + 1) % self.buffer.capacity
        self.compute(np.array([j] if i == self.next_slot else [i, j]))
        self.next_slot = j
        return {key: table[j:j + 1] for key, table in self.table.items()}


def add_features(batches, demo_features, online_features):
    """Fill obs and next_obs with the cached features of each batch's frames (rows: half demo, half online)."""
    slots = batches.pop("slot")                                                    # (U, B)
    half = slots.shape[1] // 2
    for key in online_features.table:
        for group, offset in (("obs", 0), ("next_obs", 1)):   # next_obs's frame is in the next slot
            d, o = demo_features.table[key], online_features.table[key]
            batches[group][key] = torch.cat([d[(slots[:, :half] + offset) % len(d)],
                                             o[(slots[:, half:] + offset) % len(o)]], dim=1)   # (U, B, 512, h, w)
    return batches


def control_step_batches(demo_store, online_store, cfg, rng, device):
    """One control step's utd_ratio batches on the device, from two ReplayBuffers, or from two
    FrameFeatures, whose cached backbone features then stand in for the frames."""
    cached = isinstance(online_store, FrameFeatures)
    demo, online = (store.buffer if cached else store for store in (demo_store, online_store))
    batches = to_device(sample_batches(demo, online, cfg.utd_ratio, cfg.batch_size, rng, not cached), device)
    return add_features(batches, demo_store, online_store) if cached else batches


def keep_freed_memory():
    """Let glibc keep freed memory for reuse instead of returning it to the OS.

    By default every freed block over 128 kB goes back to the OS and is page-faulted in again on
    the next allocation; at batch 256 and width 256 every activation is such a block. Keeping
    them raised a CPU control step's share of the floor from about 33 % to 40 % (measured with
    --bench). Linux with glibc only; elsewhere nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: blocks up to 32 MB come from the reusable heap
        libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
    except (OSError, AttributeError):
        pass


def pick_device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# --- the loop -----------------------------------------------------------------------------------
def image_shapes(obs):
    """{camera: (H, W, 3)} of the frames in an observation; empty without cameras."""
    return {k: v.shape for k, v in obs.items() if v.dtype == np.uint8}


def obs_to_tensors(obs, device):
    return {k: torch.as_tensor(v, device=device).unsqueeze(0) for k, v in obs.items()}   # (1, ...)


def save_checkpoint(run_dir, agent, opts, demo, online, progress):
    """Buffers first, then the agent: a stop in between loses at most the current episode."""
    online.save(run_dir / "online.npz")
    demo.save(run_dir / "demo.npz")
    state = {"agent": agent.state_dict(), "opts": {k: o.state_dict() for k, o in opts.items()}, "progress": progress}
    torch.save(state, run_dir / "checkpoint.pt.tmp")
    os.replace(run_dir / "checkpoint.pt.tmp", run_dir / "checkpoint.pt")     # atomic


def load_checkpoint(run_dir, agent, opts=None):
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; is {run_dir} a run folder of hilserl.py?")
    state = torch.load(path, map_location=next(agent.parameters()).device)
    agent.load_state_dict(state["agent"])
    for name, opt in (opts or {}).items():
        if set(state["opts"][name]) != {"m", "v", "t"}:   # torch.optim.Adam's state, before Adam was written out
            raise SystemExit(f"error: {path} holds optimizer state of an older hilserl.py, which cannot resume; "
                             f"evaluate it (--eval {run_dir}) or start a new run")
        opt.load_state_dict(state["opts"][name])
    return state["progress"]


def run_config(args):
    """The config of a new run, or of the run being resumed/evaluated with the command line on top."""
    cfg, _ = load_config(args)
    folder = cfg.resume or cfg.eval
    if folder:
        path = pathlib.Path(folder) / "config.json"
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist; pass a run folder that hilserl.py wrote (runs/...)")
        saved = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(Config)}    # settings a newer version dropped are ignored
        saved = {k: v for k, v in saved.items() if k in known}
        cfg, _ = load_config(args, Config(**{**saved, "resume": cfg.resume, "eval": cfg.eval}))
    has_compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cfg.compile and pick_device(cfg).type == "cpu" and not has_compiler:   # torch.compile builds C++ kernels
        raise SystemExit("error: --compile on a CPU needs a C++ compiler (g++ or clang++); install one or leave out --compile")
    return cfg


def diagnose(rows, cfg):
    """The lessons file: if interventions do not fall, a hyperparameter is usually wrong."""
    if rows[-1]["env_steps"] < cfg.diagnose_after_steps or len(rows) < 40:
        return None
    rate = lambda part: np.mean([r["intervention_rate"] for r in part])
    if rate(rows[-20:]) < 0.1 or rate(rows[-20:]) < rate(rows[-40:-20]):
        return None
    return (f"the intervention rate is not falling ({rate(rows[-40:-20]):.0%} -> {rate(rows[-20:]):.0%}); usual "
            f"causes: temperature_init above 0.01 (now {cfg.temperature_init}), utd_ratio below 10 (now "
            f"{cfg.utd_ratio}), no step penalty (reward_step {cfg.reward_step}), too few demos, or a human who "
            "holds the intervention button too long - let the policy act and correct it only when it goes astray")


def train(cfg, env, intervener, run_dir):
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    obs = env.reset(seed=cfg.seed)
    demo = ReplayBuffer(cfg.demo_capacity, obs, ACT_DIM)
    online = ReplayBuffer(cfg.replay_capacity, obs, ACT_DIM)
    agent = Agent(len(obs["state"]), cfg, image_shapes(obs)).to(device)
    if agent.backbone is not None and not cfg.resume:   # a resumed run's checkpoint holds the weights
        load_resnet10(agent.backbone, resnet10_weights(cfg))
    opts = make_optimizers(agent, cfg)
    progress = {"episode": 0, "env_steps": 0, "updates": 0}
    if cfg.resume:
        progress = load_checkpoint(run_dir, agent, opts)
        online.load(run_dir / "online.npz")
        demo.load(run_dir / "demo.npz")
        print(f"resumed {run_dir} at episode {progress['episode']}, {progress['env_steps']} steps")
    else:
        try:
            demo.load(cfg.demos)
        except ValueError as error:   # a file from other cameras, image size or state: one line, no traceback
            raise SystemExit(f"error: {error}") from None
        print(f"{cfg.demos}: {demo.num_episodes} demo episodes, {len(demo)} transitions")
    cached = agent.backbone is not None   # frozen features, computed once per frame (FrameFeatures)
    demo_store, online_store = (FrameFeatures(b, agent.backbone, device) for b in (demo, online)) if cached else (demo, online)
    for line in warnings_for(cfg, None if cfg.resume else demo.num_episodes):
        print(line)
    if cfg.compile:   # compile now, at home, not in the first episode
        print("compiling the update (about 30 s)...")
        twin = copy.deepcopy(agent)   # a control step's learning on a copy: the agent itself starts untouched
        learn(twin, make_optimizers(twin, cfg), control_step_batches(demo_store, demo_store, cfg, rng, device), cfg)
    log_path = run_dir / "log.csv"
    rows = list(csv.DictReader(open(log_path))) if cfg.resume and log_path.exists() else []
    rows = [{k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in r.items() if v} for r in rows]
    window = OperatorWindow(cfg)    # drawn where there is a display; prints a line per episode anyway
    window.episode = progress["episode"] + 1
    warned_slow = False
    try:
        while not cfg.max_env_steps or progress["env_steps"] < cfg.max_env_steps:
            obs = env.reset() if progress["episode"] or cfg.resume else obs
            intervener.reset()
            if cfg.port and not wait_for_start(intervener, obs):   # the human resets the scene first
                break
            ret, length, human_steps, info, timings, start = 0.0, 0, 0, {}, [], time.perf_counter()
            updates_before = progress["updates"]
            features = {}   # the frozen backbone's features of obs, once FrameFeatures has them
            while True:
                t0 = time.perf_counter()
                policy_act = agent.act({**obs_to_tensors(obs, device), **features})[0].cpu().numpy()   # SYNC POINT
                act, intervened, events = intervener.poll(policy_act, obs)
                if "success" in events:
                    env.world.succeeded = True          # the human says the task is done (real robot)
                t1 = time.perf_counter()
                next_obs, rew, terminated, truncated, step_info = env.step(act)
                truncated = truncated or bool(events & {"failure", "rerecord", "quit"})
                t2 = time.perf_counter()
                transition = (obs, act, rew, next_obs, terminated, truncated, intervened, step_info["grasp_penalty"])
                next_features = online_store.add(*transition)   # FrameFeatures returns next_obs's features
                features = next_features if cached else {}
                if intervened:
                    demo_store.add(*transition)         # a human correction is a demonstration too (hil-serl)
                if len(online) >= cfg.training_starts:
                    info = learn(agent, opts, control_step_batches(demo_store, online_store, cfg, rng, device), cfg)
                    progress["updates"] += cfg.utd_ratio
                t3 = time.perf_counter()
                timings.append((t1 - t0, t2 - t1, t3 - t2))
                if cfg.port and step_info["overrun_s"] > 0 and not warned_slow:
                    warned_slow = True
                    act_ms, robot_ms, update_ms = (1e3 * np.mean(x) for x in zip(*timings))
                    print(f"warning: the loop cannot keep {cfg.control_hz} Hz: act {act_ms:.0f} ms, robot "
                          f"{robot_ms:.0f} ms, {cfg.utd_ratio} updates {update_ms:.0f} ms per step; lower "
                          "--utd_ratio or train on a GPU")
                window.show(next_obs, intervened, rew)
                obs, ret, length = next_obs, ret + rew, length + 1
                human_steps += intervened
                progress["env_steps"] += 1
                if terminated or truncated:
                    break
            progress["episode"] += 1
            seconds = time.perf_counter() - start
            row = {"episode": progress["episode"], "env_steps": progress["env_steps"], "return": ret,
                   "length": length, "success": float(terminated), "intervention_rate": human_steps / length,
                   "updates_per_s": (progress["updates"] - updates_before) / seconds,
                   **{k: v.item() for k, v in info.items()},                            # SYNC POINT: logging
                   **dict(zip(("time/act_ms", "time/robot_ms", "time/update_ms"),
                              (1e3 * np.mean(x) for x in zip(*timings))))}
            rows.append(row)
            write_log(log_path, rows)
            window.end_episode(terminated, f"  |  {progress['env_steps']} steps, {row['updates_per_s']:.0f} updates/s")
            hint = diagnose(rows, cfg)
            if hint and progress["episode"] % 20 == 0:
                print("diagnosis: " + hint)
            if progress["episode"] % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, agent, opts, demo, online, progress)
                plot_runs([run_dir], run_dir / "curves.png")
            if "quit" in events:
                break
    finally:
        save_checkpoint(run_dir, agent, opts, demo, online, progress)   # Ctrl-C loses at most this episode
        if rows:
            plot_runs([run_dir], run_dir / "curves.png")
    return rows


def evaluate(cfg, env, run_dir):
    """The deterministic policy, no learning, no interventions: success rate and mean length."""
    device = pick_device(cfg)
    obs = env.reset(seed=cfg.seed + 10_000)               # other cube positions than in training
    agent = Agent(len(obs["state"]), cfg, image_shapes(obs)).to(device)
    load_checkpoint(run_dir, agent)
    successes, lengths = [], []
    for episode in range(cfg.eval_episodes):
        obs = env.reset() if episode else obs
        for length in range(1, cfg.episode_steps + 1):
            act = agent.act(obs_to_tensors(obs, device), deterministic=True)[0].cpu().numpy()   # SYNC POINT
            obs, _, terminated, truncated, _ = env.step(act)
            if terminated or truncated:
                break
        successes.append(terminated)
        lengths.append(length)
    print(f"eval {run_dir}: success {np.mean(successes):.0%} over {cfg.eval_episodes} episodes, "
          f"mean length {np.mean(lengths):.1f} steps")
    return float(np.mean(successes)), float(np.mean(lengths))


def write_log(path, rows):
    """The whole log, rewritten atomically after every episode (a few hundred rows at most)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{path}.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(f"{path}.tmp", path)


def plot_runs(run_dirs, out_path):
    """Learning curves against environment steps, one line per run folder, into one PNG."""
    import matplotlib
    matplotlib.use("Agg")   # no display needed
    import matplotlib.pyplot as plt
    panels = [("success", "success rate (last 20 episodes)"), ("intervention_rate", "intervention rate (last 20)"),
              ("return", "episode return"), ("length", "episode length"), ("q/mean", "critic Q"), ("alpha", "temperature")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for run_dir in run_dirs:
        rows = list(csv.DictReader(open(pathlib.Path(run_dir) / "log.csv")))
        steps = [float(r["env_steps"]) for r in rows]
        for ax, (key, title) in zip(axes.flat, panels):
            values = np.array([float(r.get(key) or "nan") for r in rows])
            smooth = [np.nanmean(values[max(0, i - 19):i + 1]) for i in range(len(values))] if key in ("success", "intervention_rate") else values
            ax.plot(steps, smooth, label=pathlib.Path(run_dir).name)
            ax.set_title(title)
            ax.set_xlabel("environment steps")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(f"{out_path}.tmp.png")
    plt.close(fig)
    os.replace(f"{out_path}.tmp.png", out_path)


# --- the reward classifier: python hilserl.py --train_classifier FRAMES --classifier OUT ---------------
def classifier_data(path):
    """(frames {camera: (N, H, W, 3)}, labels (N,), held_out (N,) bool) from `python teleop.py label`'s file.

    Every fifth episode is held out whole, as neighbouring frames look nearly the same.
    """
    try:
        data = np.load(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path}: not a readable .npz file ({error})") from None
    with data:
        if "success" not in data.files or "episode" not in data.files:
            raise SystemExit(f"error: {path} holds no labelled frames; record them with python teleop.py label --frames {path}")
        frames = {k: data[k] for k in data.files if k not in ("success", "episode")}
        return frames, data["success"].astype(np.float32), data["episode"] % 5 == 4


def backbone_features(backbone, frames, device, chunk=256):
    """The frozen backbone once per frame, in chunks: (N, H, W, 3) uint8 -> (N, 512, h, w) on device."""
    return torch.cat([backbone(torch.from_numpy(frames[i:i + chunk]).to(device)) for i in range(0, len(frames), chunk)])


def fit_classifier(classifier, features, labels, train_idx, steps, rng, batch_size=256):
    """BCE on balanced batches, half positive and half negative frames, Adam 1e-4 (hil-serl).

    hil-serl also shifts the frames randomly; we train on cached features, so we do not.
    """
    positives, negatives = train_idx[labels[train_idx] == 1], train_idx[labels[train_idx] == 0]
    if not len(positives) or not len(negatives):
        raise SystemExit("error: the classifier needs positive (success) and negative frames to train on")
    adam = Adam([p for p in classifier.parameters() if p.requires_grad], lr=1e-4)
    half = batch_size // 2
    y = torch.cat([torch.ones(half), torch.zeros(half)]).to(next(iter(features.values())).device)
    for _ in range(steps):
        idx = np.concatenate([rng.choice(positives, half), rng.choice(negatives, half)])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier({k: f[idx] for k, f in features.items()}), y)
        adam.step(torch.autograd.grad(loss, adam.params))


@torch.no_grad()
def precision_recall(classifier, features, labels, idx):
    """Of the frames in idx called success, the share that are; of the successes, the share found."""
    called = (torch.sigmoid(classifier({k: f[idx] for k, f in features.items()})) > classifier.threshold).cpu().numpy()
    actual = labels[idx] == 1                                                    # SYNC POINT above: the scores
    hits = (called & actual).sum()
    return hits / max(called.sum(), 1), hits / max(actual.sum(), 1)


def train_classifier(cfg):
    if not cfg.classifier:
        raise SystemExit("error: --train_classifier needs --classifier PATH, the file to write the classifier to")
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    frames, labels, held_out = classifier_data(cfg.train_classifier)
    shapes = {k: f.shape[1:] for k, f in frames.items()}
    classifier = RewardClassifier(shapes, cfg).to(device)
    load_resnet10(classifier.backbone, resnet10_weights(cfg))
    features = {k: backbone_features(classifier.backbone, f, device) for k, f in frames.items()}
    train_idx, test_idx = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    if not len(test_idx):
        raise SystemExit(f"error: {cfg.train_classifier} has fewer than 5 episodes; every fifth is held out to test on")
    fit_classifier(classifier, features, labels, train_idx, cfg.classifier_steps, np.random.default_rng(cfg.seed))
    precision, recall = precision_recall(classifier, features, labels, test_idx)
    print(f"{cfg.train_classifier}: {int(labels.sum())} success frames of {len(labels)}; held out "
          f"{len(test_idx)} frames ({int(labels[test_idx].sum())} successes): precision {precision:.0%}, "
          f"recall {recall:.0%} at threshold {cfg.classifier_threshold}")
    torch.save({"image_shapes": shapes, "classifier": classifier.state_dict()}, cfg.classifier)
    print(f"wrote {cfg.classifier}; use it with --classifier {cfg.classifier} --use_images true")


def load_classifier(cfg, device):
    saved = torch.load(cfg.classifier, map_location=device)
    classifier = RewardClassifier(saved["image_shapes"], cfg).to(device)
    classifier.load_state_dict(saved["classifier"])
    return classifier


# --- benchmark: python hilserl.py --bench ------------------------------------------------------
class ReferenceLearner:
    """The same update written the straightforward way, as the benchmark's yardstick.

    Separate critic modules in a Python loop, one optimizer per network stepped one at a time,
    a fresh numpy batch copied to the device for every update, a per-tensor target update.
    """

    def __init__(self, state_dim, cfg, device):
        self.cfg, self.device = cfg, device
        self.actor = Actor(state_dim, EE_DIM, cfg).to(device)
        self.encoder = Encoder(state_dim, cfg.state_latent_dim).to(device)
        self.critics = [mlp(self.encoder.out_dim + EE_DIM, cfg.hidden_dim, 1).to(device) for _ in range(cfg.num_critics)]
        self.grasp_critic = GraspCritic(self.encoder.out_dim, cfg.hidden_dim).to(device)
        self.online = [self.encoder, *self.critics, self.grasp_critic]
        self.targets = [Encoder(state_dim, cfg.state_latent_dim).to(device)] + \
            [mlp(self.encoder.out_dim + EE_DIM, cfg.hidden_dim, 1).to(device) for _ in self.critics] + \
            [GraspCritic(self.encoder.out_dim, cfg.hidden_dim).to(device)]
        for target, online in zip(self.targets, self.online):
            target.load_state_dict(online.state_dict())
        self.log_alpha = torch.tensor(math.log(cfg.temperature_init), device=device, requires_grad=True)
        self.opts = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in self.online + [self.actor]]
        self.temperature_opt = torch.optim.Adam([self.log_alpha], lr=cfg.lr)

    def update(self, b, with_actor):
        cfg, t_enc, *t_critics, t_grasp = self.cfg, *self.targets
        with torch.no_grad():
            next_act, _ = self.actor(b["next_obs"])
            z_next = t_enc(b["next_obs"])
            q_next = torch.min(torch.stack([c(torch.cat([z_next, next_act], -1)).squeeze(-1) for c in t_critics]), 0).values
            y = b["rew"] + cfg.discount * (1 - b["terminated"]) * q_next
            best = self.grasp_critic(self.encoder(b["next_obs"])).argmax(-1, keepdim=True)
            y_grasp = b["rew"] + b["grasp_penalty"] + cfg.discount * (1 - b["terminated"]) * t_grasp(z_next).gather(-1, best).squeeze(-1)
        z = self.encoder(b["obs"])
        loss = sum(((c(torch.cat([z, b["act"][:, :EE_DIM]], -1)).squeeze(-1) - y) ** 2).mean() for c in self.critics) / len(self.critics)
        cls = b["act"][:, EE_DIM].round().long() + 1
        loss = loss + ((self.grasp_critic(z).gather(-1, cls[:, None]).squeeze(-1) - y_grasp) ** 2).mean()
        for opt in self.opts:
            opt.zero_grad()
        loss.backward()
        for opt in self.opts[:-1]:
            opt.step()
        with torch.no_grad():
            for target, online in zip(self.targets, self.online):
                for pt, p in zip(target.parameters(), online.parameters()):
                    pt.mul_(1 - cfg.tau).add_(cfg.tau * p)
        if with_actor:
            act, log_prob = self.actor(b["obs"])
            z = self.encoder(b["obs"]).detach()
            q = torch.stack([c(torch.cat([z, act], -1)).squeeze(-1) for c in self.critics]).mean(0)
            actor_loss = (self.log_alpha.exp().detach() * log_prob - q).mean()
            self.opts[-1].zero_grad()
            actor_loss.backward()
            self.opts[-1].step()
            temperature_loss = self.log_alpha.exp() * (-log_prob.detach().mean() - target_entropy())
            self.temperature_opt.zero_grad()
            temperature_loss.backward()
            self.temperature_opt.step()

    def learn(self, demo, online, rng):
        for i in range(self.cfg.utd_ratio):
            b = to_device({k: v[0] for k, v in sample_batches(demo, online, 1, self.cfg.batch_size, rng).items()}, self.device)
            self.update(b, with_actor=i == self.cfg.utd_ratio - 1)


def control_step_flops(state_dim, cfg):
    """Matrix-multiply FLOPs of one control step's learning (2 per multiply-add; elementwise work ignored).

    A linear layer on n rows costs 2 n in out forward, as much again for the gradient of its
    input and for the gradient of its weights, when those are needed.
    """
    B, U, E, H, L, A = cfg.batch_size, cfg.utd_ratio, cfg.num_critics, cfg.hidden_dim, cfg.state_latent_dim, EE_DIM
    def fwd(rows, dims):
        return sum(2 * rows * i * o for i, o in zip(dims[:-1], dims[1:]))
    encoder, critic = fwd(B, [state_dim, L]), E * fwd(B, [L + A, H, H, 1])
    grasp, actor = fwd(B, [L, H, H, 3]), fwd(B, [state_dim, L, H, H, 2 * A])
    per_critic_update = (
        encoder + critic + encoder + grasp + grasp         # targets: target enc, critics; online enc, grasp; target grasp
        + 2 * encoder + 3 * critic + 3 * grasp)            # online: encoder fwd + weight grads; critics, grasp fwd + 2 bwd
    actor_update = (3 * actor - fwd(B, [state_dim, L])     # the state needs no gradient
                    + encoder + 2 * critic)       # critics: fwd + input grads (for the action), no weight grads
    return U * per_critic_update + U * actor + actor_update   # U*actor: next actions for every batch


def matmul_rate(device, n=256, seconds=1.0):
    """Measured FLOP/s of float32 (n, n) x (n, n) matmuls, the shape that dominates the update."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ b
        count += 20
        if device.type == "cuda":
            torch.cuda.synchronize()   # SYNC POINT: timing
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def random_buffers(example, slots, rng):
    """(demo, online) buffers, each half full of random transitions shaped like `example`.

    Frames come from a pool of 16 random images: what the benchmarks time does not depend on
    what the pictures show, and drawing 100 MB of random bytes would only slow the set-up.
    """
    buffers = ReplayBuffer(slots, example, ACT_DIM), ReplayBuffer(slots, example, ACT_DIM)
    pool = {k: rng.integers(0, 256, (16, *v.shape), dtype=np.uint8) for k, v in example.items() if v.dtype == np.uint8}
    for buf in buffers:
        for t in range(slots // 2):
            obs, next_obs = ({k: pool[k][(t + i) % 16] if k in pool else rng.standard_normal(v.shape).astype(np.float32)
                              for k, v in example.items()} for i in (0, 1))
            act = np.append(rng.uniform(-1, 1, EE_DIM), rng.integers(-1, 2)).astype(np.float32)
            buf.add(obs, act, rng.normal(), next_obs, t % 100 == 99, False, False)
    return buffers


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def timed(fn, device, repeats=10, warmup=2):
    """Mean seconds per call of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()                 # SYNC POINT: timing
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()                 # SYNC POINT: timing
    return (time.perf_counter() - start) / repeats


def benchmark(cfg, rounds=5):
    """--bench: one control step's learning, ours against the reference and the arithmetic floor.

    This machine's speed can drift within seconds, so each round measures the matmul rate right
    before timing both learners, and the round with the median share of the floor is reported.
    """
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    state_dim = 12   # the sim's state: 5 joints, gripper, EE position, cube relative to the EE
    demo, online = random_buffers({"state": np.zeros(state_dim, np.float32)}, 20_000, rng)
    agent = Agent(state_dim, cfg).to(device)
    opts = make_optimizers(agent, cfg)
    reference = ReferenceLearner(state_dim, cfg, device)
    def our_step():
        learn(agent, opts, control_step_batches(demo, online, cfg, rng, device), cfg)

    ours = "compiled" if cfg.compile else "hilserl"
    learners = {ours: our_step, "reference": lambda: reference.learn(demo, online, rng)}
    flops = control_step_flops(state_dim, cfg)
    print(f"device: {device_name(device)}; torch {torch.__version__}; utd_ratio {cfg.utd_ratio}, batch {cfg.batch_size}, "
          f"{cfg.num_critics} critics, hidden {cfg.hidden_dim}; one control step = {flops / 1e9:.2f} GFLOP")
    for fn in learners.values():   # warm-up (and, with --compile, compiling)
        fn(), fn()
    results = []   # per round: (share of the floor, matmul rate, {learner: seconds})
    for _ in range(rounds):
        rate = matmul_rate(device, seconds=0.5)
        seconds = {label: timed(fn, device, repeats=5, warmup=0) for label, fn in learners.items()}
        results.append((flops / rate / seconds[ours], rate, seconds))
    shares = sorted(r[0] for r in results)
    _, rate, seconds = sorted(results, key=lambda r: r[0])[rounds // 2]
    print(f"median of {rounds} rounds (the share of the floor ranged {shares[0]:.0%} - {shares[-1]:.0%}): "
          f"matmul rate (256x256 @ 256x256) {rate / 1e9:.1f} GFLOP/s, floor {flops / rate * 1e3:.1f} ms")
    for label, s in seconds.items():
        print(f"{label:>9}: {s * 1e3:7.1f} ms per control step, {cfg.utd_ratio / s:7.0f} updates/s, "
              f"{flops / rate / s:4.0%} of the floor's speed")
    print(f"speed-up over the reference: {seconds['reference'] / seconds[ours]:.2f}x")


def benchmark_images(cfg, slots=4_000, repeats=5):
    """--bench --use_images true: one control step's learning with two cameras (cfg.encoder's trunk).

    resnet10: the update reads cached features, filled here with random numbers (the backbone's
    own cost per frame is timed apart, and what running it in every update would cost is derived).
    """
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    size = cfg.image_size
    example = {"state": np.zeros(12, np.float32), "front": np.zeros((size, size, 3), np.uint8),
               "wrist": np.zeros((size, size, 3), np.uint8)}
    agent = Agent(12, cfg, image_shapes(example)).to(device)
    opts = make_optimizers(agent, cfg)
    demo, online = random_buffers(example, slots, rng)
    cached = agent.backbone is not None
    stores = [FrameFeatures(b, agent.backbone, device) for b in (demo, online)] if cached else [demo, online]
    for store in stores if cached else []:   # random features stand in for the backbone's
        for table in store.table.values():
            table.normal_()

    def step():
        learn(agent, opts, control_step_batches(*stores, cfg, rng, device), cfg)

    print(f"device: {device_name(device)}; torch {torch.__version__}; two {size}x{size} cameras, encoder {cfg.encoder}; "
          f"utd_ratio {cfg.utd_ratio}, batch {cfg.batch_size}")
    seconds = timed(step, device, repeats)
    print(f"  hilserl: {seconds * 1e3:7.1f} ms per control step, {cfg.utd_ratio / seconds:7.0f} updates/s")
    if cached:
        two = torch.from_numpy(demo.arrays["front"][:2]).to(device)
        frame_s = timed(lambda: agent.backbone(two), device) / 2
        per_step = cfg.utd_ratio * cfg.batch_size * 2 * 2   # updates x rows x (obs, next_obs) x cameras
        print(f" backbone: {frame_s * 1e3:7.1f} ms per frame (batch of 2); run in every update instead of "
              f"cached it would add ~{per_step * frame_s:.1f} s per control step ({per_step} frames)")


def main():
    cfg = run_config(sys.argv[1:])
    keep_freed_memory()
    if cfg.bench:
        return benchmark_images(cfg) if cfg.use_images else benchmark(cfg)
    if cfg.train_classifier:
        return train_classifier(cfg)
    if cfg.plot:
        *run_dirs, out_path = cfg.plot.split(",")
        return plot_runs(run_dirs, out_path)
    if cfg.eval:
        with make_env(cfg, cfg.seed + 10_000) as env:    # other cube positions than in training
            return evaluate(cfg, env, pathlib.Path(cfg.eval))
    if not cfg.resume and not os.path.exists(cfg.demos):
        if cfg.port:
            raise SystemExit(f"error: {cfg.demos} does not exist; record demos first: "
                             f"python teleop.py record --port {cfg.port} --demos {cfg.demos}")
        print(f"{cfg.demos} does not exist: the scripted expert records {cfg.demo_episodes} demo episodes first")
        record_demos(cfg, cfg.demos, cfg.demo_episodes)
    run_dir = pathlib.Path(cfg.resume or cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    print(f"run folder: {run_dir}")
    if cfg.classifier and not cfg.use_images:
        raise SystemExit("error: --classifier judges camera frames; add --use_images true")
    try:
        with make_env(cfg, cfg.seed) as env:   # SAFETY: torque off however the run ends
            if cfg.classifier:
                env.classifier = load_classifier(cfg, pick_device(cfg)).success
            train(cfg, env, make_teleop(cfg, env), run_dir)
    except (BusError, ServoError, EmergencyStop) as error:   # the message names the servo and what to do
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:   # Ctrl-C: train() has saved the checkpoint on its way out
        raise SystemExit(f"stopped; continue with: python hilserl.py --resume {run_dir}") from None


if __name__ == "__main__":
    main()
