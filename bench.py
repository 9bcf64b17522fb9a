"""Measurement, beside the spine: one control step's learning, and the robot's side of the loop.

    python bench.py [update] [images] [bus] [sim] [soak] [loop] [--setting value]   default: the first four
update: eager (hilserl.py) and compiled (fast.py) against the matmul floor and a plain reference learner,
in 5 rounds (the speed drifts: the median round, by share of the floor, is shown), and two figures for any
device: operator calls (at this size a GPU waits on launches) and the bytes Adam and the target update move.
loop: what episode videos and diagnostics add to a training control step, filmed and not, side by side.
"""

import contextlib
import copy
import dataclasses
import math
import os
import pathlib
import time

import numpy as np
import torch

import fast
import hilserl
from buffer import ReplayBuffer, sample_batches
from config import load_config
from networks import Actor, Agent, Encoder, GraspCritic, mlp, pick_device
from vision import FrameFeatures
from robot import ACT_DIM, EE_DIM, IDS, BusError, FeetechBus, ServoEmulator, SO101Env

STATE_DIM = 12   # the sim's state: 5 joints, gripper, EE position, cube relative to the EE
torch._inductor.config.cpp.enable_kernel_profile = True   # CPU kernels name themselves to the profiler
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::to", "aten::resolve_conj",
             "aten::resolve_neg", "aten::result_type", "aten::lift_fresh", "aten::set_"}


class ReferenceLearner:
    """The same update done plainly, the yardstick: separate critic modules in a Python loop, one optimizer
    per network stepped one at a time, a fresh numpy batch on the device per update, per-tensor targets."""

    def __init__(self, state_dim, cfg, device):
        self.cfg, self.device = cfg, device
        self.actor = Actor(state_dim, EE_DIM, cfg).to(device)
        self.encoder = Encoder(state_dim, cfg.state_latent_dim).to(device)
        self.critics = [mlp(self.encoder.out_dim + EE_DIM, cfg.hidden_dim, 1).to(device)
                        for _ in range(cfg.num_critics)]
        self.grasp_critic = GraspCritic(self.encoder.out_dim, cfg.hidden_dim).to(device)
        self.online = torch.nn.ModuleList([self.encoder, *self.critics, self.grasp_critic])
        self.targets = copy.deepcopy(self.online)
        self.log_alpha = torch.tensor(math.log(cfg.temperature_init), device=device, requires_grad=True)
        self.opts = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in [*self.online, self.actor]]
        self.temperature_opt = torch.optim.Adam([self.log_alpha], lr=cfg.lr)

    def update(self, b, with_actor):
        cfg, t_enc, *t_critics, t_grasp = self.cfg, *self.targets
        with torch.no_grad():
            next_act, _ = self.actor(b["next_obs"])
            z_next = t_enc(b["next_obs"])
            q_next = torch.min(torch.stack([c(torch.cat([z_next, next_act], -1)).squeeze(-1)
                                            for c in t_critics]), 0).values
            y = b["rew"] + cfg.discount * (1 - b["terminated"]) * q_next
            best = self.grasp_critic(self.encoder(b["next_obs"])).argmax(-1, keepdim=True)
            q_grasp_next = t_grasp(z_next).gather(-1, best).squeeze(-1)
            y_grasp = b["rew"] + b["grasp_penalty"] + cfg.discount * (1 - b["terminated"]) * q_grasp_next
        z = self.encoder(b["obs"])
        loss = sum(((c(torch.cat([z, b["act"][:, :EE_DIM]], -1)).squeeze(-1) - y) ** 2).mean()
                   for c in self.critics) / len(self.critics)
        cls = b["act"][:, EE_DIM].round().long() + 1
        loss = loss + ((self.grasp_critic(z).gather(-1, cls[:, None]).squeeze(-1) - y_grasp) ** 2).mean()
        for opt in self.opts:
            opt.zero_grad()
        loss.backward()
        for opt in self.opts[:-1]:
            opt.step()
        with torch.no_grad():
            for pt, p in zip(self.targets.parameters(), self.online.parameters()):
                pt.mul_(1 - cfg.tau).add_(cfg.tau * p)
        if with_actor:
            act, log_prob = self.actor(b["obs"])
            z = self.encoder(b["obs"]).detach()
            q = torch.stack([c(torch.cat([z, act], -1)).squeeze(-1) for c in self.critics]).mean(0)
            actor_loss = (self.log_alpha.exp().detach() * log_prob - q).mean()
            temperature_loss = self.log_alpha.exp() * (-log_prob.detach().mean() - hilserl.TARGET_ENTROPY)
            for opt, loss in ((self.opts[-1], actor_loss), (self.temperature_opt, temperature_loss)):
                opt.zero_grad()
                loss.backward()
                opt.step()

    def learn(self, demo, online, rng):
        for i in range(self.cfg.utd_ratio):
            batch = {k: v[0] for k, v in sample_batches(demo, online, 1, self.cfg.batch_size, rng).items()}
            self.update(hilserl.to_device(batch, self.device), with_actor=i == self.cfg.utd_ratio - 1)


def launches_kernel(name):
    """A compiled kernel, or an ATen operator that computes: not a view of its input, not an allocation."""
    if "cpp_fused" in name or "triton_" in name:
        return True
    op = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if not name.startswith("aten::") or name in NO_KERNEL or op is None:
        return False
    returns = getattr(op, op.overloads()[0])._schema.returns if op.overloads() else []
    alias = returns[0].alias_info if returns else None   # _foreach_ ops in place return nothing
    return alias is None or alias.is_write               # add_ writes its input; view, detach only alias it


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side writes a line to stderr as it starts and stops: chatter, not a figure."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def operator_calls(fn):
    """Outermost operator calls while fn() runs, by torch.profiler: every call is a kernel or more."""
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    def count(event):
        return 1 if launches_kernel(event.name) else sum(count(child) for child in event.cpu_children)
    return sum(count(e) for e in prof.events() if e.cpu_parent is None)


def matmul_rate(device, n=256, seconds=0.5):
    """Measured FLOP/s of float32 (n, n) x (n, n) matmuls, the shape that dominates the update."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += 20
        timed(lambda: a @ b, device, repeats=20)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def timed(fn, device, repeats=5):
    """Mean seconds per call of fn, from and to an idle device."""
    # SYNC POINT
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def device_name(device):
    if device.type == "cpu":
        return f"cpu, {torch.get_num_threads()} threads"
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "mps (Apple GPU)"


def setup(cfg, example, slots, rng, device):
    """An agent, its optimizers, (demo, online) buffers half full of random transitions shaped like `example`
    (frames from a pool of 16: timings do not depend on the pictures), and batches(), a control step's
    batches. With the ResNet-10, random numbers stand in for the frames' features (the caches: `features`)."""
    demo, online = ReplayBuffer(slots, example, ACT_DIM), ReplayBuffer(slots, example, ACT_DIM)
    agent = Agent(STATE_DIM, cfg, hilserl.image_shapes(example)).to(device)
    copies = hilserl.SHIFTED_COPIES if cfg.augment else 1
    features = [FrameFeatures(b, agent.backbone, device, copies) if agent.backbone else None
                for b in (demo, online)]
    pool = {k: rng.integers(0, 256, (16, *v.shape), dtype=np.uint8)
            for k, v in example.items() if v.dtype == np.uint8}
    for buf in (demo, online):
        for t in range(slots // 2):
            obs, next_obs = ({k: pool[k][(t + i) % 16] if k in pool
                                 else rng.standard_normal(v.shape).astype(np.float32)
                              for k, v in example.items()} for i in (0, 1))
            act = np.append(rng.uniform(-1, 1, EE_DIM), rng.integers(-1, 2)).astype(np.float32)
            buf.add(obs, act, rng.normal(), next_obs, t % 100 == 99, False, False)
    for cache in (f for f in features if f):
        for key in cache.table:
            cache.table[key].random_(0, 256)
            cache.scale[key].uniform_(0, 0.05)
    return agent, hilserl.make_optimizers(agent, cfg), demo, online, features, \
        lambda: hilserl.control_step_batches(demo, online, cfg, rng, device, *features)


def bench_update(cfg, device, rounds=5):
    """The eager spine is timed first: fast.Learner changes the process (keep_freed_memory) and the agent."""
    rng = np.random.default_rng(cfg.seed)
    example = {"state": np.zeros(STATE_DIM, np.float32)}
    agent, optimizers, demo, online, _, batches = setup(cfg, example, 20_000, rng, device)
    reference = ReferenceLearner(STATE_DIM, cfg, device)
    spine, ref = (lambda: hilserl.learn(agent, optimizers, cfg, batches()),
                  lambda: reference.learn(demo, online, rng))
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:   # the matmuls learn runs
        spine()   # (a test checks them against the layers' sizes)
    flops = counter.get_total_flops()
    print(f"update: {device_name(device)}; torch {torch.__version__}; utd_ratio {cfg.utd_ratio}, batch "
          f"{cfg.batch_size}, {cfg.num_critics} critics, hidden {cfg.hidden_dim}; one control step = "
          f"{flops / 1e9:.2f} GFLOP of matmuls")
    critic = sum(p.numel() for p in agent.critic_params.values())
    actor = sum(p.numel() for p in agent.actor.parameters()) + 1   # + log_alpha
    # At least, per float32 parameter: Adam reads it, its gradient and two moments, writes three (28 B); the
    # target update reads target and parameter, writes the target (12 B). utd_ratio critic updates, one actor.
    state_mb = (cfg.utd_ratio * critic * (28 + 12) + actor * 28) / 1e6
    print(f"  optimizer and target state read and written per control step: {state_mb:.1f} MB")

    def median_round(fn):   # (share of the floor, matmul rate, seconds, reference seconds, all shares)
        runs = [(matmul_rate(device), timed(fn, device), timed(ref, device)) for _ in range(rounds)]
        rows = sorted((flops / rate / seconds, rate, seconds, ref_seconds)
                      for rate, seconds, ref_seconds in runs)
        return (*rows[rounds // 2], [row[0] for row in rows])

    spine(), ref()
    eager_calls, eager = operator_calls(spine), median_round(spine)
    learner = fast.Learner(agent, optimizers, cfg, batches())
    compiled = lambda: learner(batches())
    compiled()
    print(f"  operator calls per control step: eager {eager_calls}, compiled {operator_calls(compiled)}")
    results = {"hilserl (eager)": eager, "compiled (fast.py)": median_round(compiled)}
    for label, (share, rate, seconds, ref_seconds, shares) in results.items():
        print(f"  {label:>18}: {seconds * 1e3:6.1f} ms per control step ({cfg.utd_ratio / seconds:4.0f} "
              f"updates/s), {share:4.0%} of the floor ({flops / rate * 1e3:.1f} ms at {rate / 1e9:.0f} "
              f"GFLOP/s; {rounds} rounds {min(shares):.0%} - {max(shares):.0%}); reference "
              f"{ref_seconds * 1e3:.1f} ms, {ref_seconds / seconds:.2f}x")


def bench_images(cfg, device, slots=2_000):
    """Two cameras, each encoder, with and without --augment: a control step's parts that the encoder changes,
    eager. The ResNet-10 runs when a frame is stored (its copies too); the small CNN in every update."""
    frame = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    example = {"state": np.zeros(STATE_DIM, np.float32), "front": frame, "wrist": frame}
    print(f"images: {device_name(device)}; two {cfg.image_size}x{cfg.image_size} cameras; utd_ratio "
          f"{cfg.utd_ratio}, batch {cfg.batch_size}; ms per control step, eager; store: a frame per camera")
    for encoder, augment in (("resnet10", False), ("resnet10", True), ("small", False), ("small", True)):
        c = dataclasses.replace(cfg, encoder=encoder, augment=augment)
        rng = np.random.default_rng(0)
        agent, optimizers, demo, online, (_, cache), batches = setup(c, example, slots, rng, device)
        store_ms = timed(lambda: cache.compute(np.array([2])), device) * 1e3 if cache else 0.0
        obs = {k: torch.as_tensor(v, device=device)[None] for k, v in example.items()}
        obs.update(cache.add(2) if cache else {})   # resnet10 acts on the cached features of the new frames
        act_ms = timed(lambda: agent.act(obs), device) * 1e3
        spine = lambda: hilserl.learn(agent, optimizers, c, batches())
        spine()
        update_ms = timed(spine, device) * 1e3
        kept = sum(t[0].nbytes + cache.scale[k][0].nbytes for k, t in cache.table.items()) / 2 if cache else 0
        total_ms = act_ms + store_ms + update_ms
        print(f"  {encoder:>8}, augment {'on' if augment else 'off':>3}: {total_ms:7.1f} (act {act_ms:5.1f}, "
              f"store {store_ms:5.1f}, updates {update_ms:7.1f}); features: "
              f"{kept * 1e5 / 1e9:.2f} GB per 100,000 frames per camera")


def bench_bus(cfg, n=2000):
    """One SYNC_READ of six positions plus one SYNC_WRITE against the emulator, beside their wire time."""
    bus = FeetechBus(ServoEmulator(), cfg.baudrate)
    round_trip = lambda: bus.sync_write("Goal_Position",
                                        dict(zip(IDS, bus.sync_read("Present_Position", IDS))))
    driver_ms = timed(round_trip, torch.device("cpu"), repeats=n) * 1e3
    wire_bytes = (6 + 2 + 6) + 6 * (6 + 2) + (6 + 2 + 6 * 3)  # request, six replies, SYNC_WRITE
    print(f"bus: SYNC_READ x6 + SYNC_WRITE: driver + emulator {driver_ms:.3f} ms; wire time of the "
          f"{wire_bytes} bytes at {cfg.baudrate} baud {wire_bytes * 10 / cfg.baudrate * 1e3:.3f} ms")


def bench_soak(cfg, n=10_000):
    """Transactions over the virtual arm's faulty serial port: every answer must be right or an error."""
    import serial
    from sim import VirtualArm
    arm = VirtualArm(dataclasses.replace(cfg, serve_fault_rate=cfg.serve_fault_rate or 0.05))
    bus = FeetechBus(serial.Serial(arm.port, cfg.baudrate), cfg.baudrate, cfg.read_retries, cfg.bus_latency_s)
    known = {"Model_Number": 777, "Max_Position_Limit": 4095, "Protection_Current": 500,
             "Max_Torque_Limit": 1000}
    wrong, errors, rng, start = 0, 0, np.random.default_rng(0), time.perf_counter()
    for _ in range(n):   # factory values, two bytes each: a late reply mistaken for another's shows as wrong
        servo_id, name = int(rng.integers(1, 7)), str(rng.choice(list(known)))
        try:
            wrong += bus.read(servo_id, name) != known[name]
        except BusError:
            errors += 1
    print(f"soak: {n} transactions through the virtual arm's port ({arm.port}), {arm.faults} faults injected "
          f"({arm.faults / n:.1%}; drop, bad checksum, truncated, garbage, late): {wrong} wrong values, "
          f"{errors} errors after {cfg.read_retries} retries, {time.perf_counter() - start:.1f} s")
    arm.close()


def bench_sim(cfg, steps=1000):
    """Control steps per second of SO101Env.step (bus, IK, physics), without and with cameras."""
    from sim import ScriptedExpert, make_sim
    arm, cameras, world = make_sim(cfg, cfg.seed)
    expert = ScriptedExpert(cfg, world, cfg.seed)
    with SO101Env(cfg, arm, cameras, world) as env:
        for use_images in (False, True):
            cfg.use_images = use_images
            obs, elapsed_s = env.reset(cfg.seed), 0.0
            for _ in range(steps):
                act, start = expert.act(obs), time.perf_counter()
                obs, rew, terminated, truncated, info = env.step(act)
                elapsed_s += time.perf_counter() - start
                if terminated or truncated:  # resets are not timed
                    obs = env.reset()
                    expert.reset()
            what = f"two {cfg.image_size}x{cfg.image_size} cameras" if use_images else "state only"
            print(f"sim: SO101Env.step, bus + IK + physics, {what}: {steps / elapsed_s:6.0f} control steps/s")


def bench_loop(cfg, rounds=3):
    """What videos and diagnostics add to the loop: the sim, these settings, updates on. After a warm-up
    episode, each round trains one episode unfilmed, then one filmed, side by side."""
    import tempfile
    import diagnostics
    import teleop
    folder = pathlib.Path(tempfile.mkdtemp())
    cfg = dataclasses.replace(cfg, demos=str(folder / "demos.npz"), demo_episodes=5)
    teleop.record_demos(cfg, cfg.demos, cfg.demo_episodes)
    with teleop.make_env(cfg, cfg.seed) as env:
        obs = env.reset(seed=cfg.seed)
        run, expert, status = (hilserl.start_run(cfg, obs, folder), teleop.make_teleop(cfg, env),
                               teleop.StatusLine())
        figures = {False: [], True: []}   # filmed -> [(act + robot ms, update ms, diagnostics ms) per step]
        for filmed in [False] + [False, True] * rounds:
            obs = env.reset()
            expert.reset()
            video = (diagnostics.episode_video(folder / "video.webm", env, obs, cfg.control_hz)
                     if filmed else (None, None))
            row, _, episode = hilserl.run_episode(run, env, expert, obs, status, *video)
            begin = time.perf_counter()   # what run_episode spent on the diagnostics, once more
            diagnostics.episode_diagnostics(episode, episode.arrays["act"][:len(episode)],
                                            diagnostics.episode_q(run.agent, episode), cfg.discount)
            figures[filmed].append((row["time/act_ms"] + row["time/robot_ms"], row["time/update_ms"],
                                    1e3 * (time.perf_counter() - begin) / row["length"]))
    (plain, plain_update, diag), (film, film_update, _) = (np.median(figures[f][-rounds:], axis=0)
                                                           for f in (False, True))
    print(f"loop (sim, state, utd_ratio {cfg.utd_ratio}, {cfg.episode_steps}-step episodes; median of "
          f"{rounds} rounds, side by side):")
    print(f"  act + robot per step   {plain:6.2f} ms unfilmed, {film:6.2f} ms filmed "
          f"({film - plain:+.2f} ms)")
    print(f"  diagnostics per step   {diag:6.3f} ms (once an episode, spread over its steps)")
    print(f"  updates per step       {plain_update:6.1f} ms unfilmed, {film_update:6.1f} ms filmed "
          "(the encoder thread shares the CPU)")
    per_step = (film - plain) / max(cfg.video_every, 1) + diag
    print(f"  at --video_every {cfg.video_every}: {per_step:+.2f} ms act + robot + logging per step")


if __name__ == "__main__":
    cfg, words = load_config()
    sections = words or ["update", "images", "bus", "sim"]
    if set(sections) - {"update", "images", "bus", "sim", "soak", "loop"}:
        raise SystemExit("usage: python bench.py [update] [images] [bus] [sim] [soak] [loop]   "
                         "[--field value ...]")
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    for section in sections:
        if section in ("update", "images"):
            (bench_update if section == "update" else bench_images)(cfg, device)
        else:
            {"bus": bench_bus, "sim": bench_sim, "soak": bench_soak, "loop": bench_loop}[section](cfg)
