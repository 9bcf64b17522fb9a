"""The human in the loop: gamepad or leader arm -> intervention action and episode events.

Before every env.step the loop asks `teleop.poll(policy_act, obs)`: while intervene is held (RB, as in
LeRobot; hil-serl's SpaceMouse intervenes on any motion) the human's action replaces the policy's and is
stored with intervened=True, so the demo buffer gets it too. Presses are events: success, failure, re-record,
emergency stop (torque off at once), quit. Each device gives act in the policy's action space (float32 (4,):
EE delta x, y, z in [-1, 1], gripper -1 close / 0 stay / +1 open) and held, the controls now held. From behind
the arm: left stick up = +x (away from the base), left stick left = +y, right stick up = +z.

Commands: `python teleop.py record` records demos (cfg.demos); `label` labels frames success or not for the
reward classifier (cfg.frames); `import-lerobot DATASET_DIR` turns an SO-101 LeRobot dataset into demos.
"""

import atexit
import importlib
import json
import os
import pathlib
import sys
import time
import urllib.request

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
import numpy as np
import pygame

from buffer import ReplayBuffer, read_npz, save_npz, writable
from config import load_config
from robot import (ACT_DIM, EE_DIM, IDS, JOINTS, SO101, FeetechBus, RealWorld, RobotError, SO101Env,
                   forward_kinematics, load_calibration, make_cameras, open_bus, parse_cameras, process_frame,
                   ticks_to_joints)

EVENTS = ("success", "failure", "rerecord", "estop", "quit")   # pressed once, acted on once

# --- gamepad: layouts and the pure mapping ---------------------------------------------------------
# Numbers as pygame 2 documents them ("Common Controller Axis Mappings") for the "Xbox 360 Controller" and the
# "PS4 Controller"; other pads may differ: `python -m pygame.examples.joystick` shows them, --gamepad_map
# remaps. Triggers are axes that rest at -1. Controls as in LeRobot: hold RB (R1) to intervene, LT/RT
# close/open, Y success, A failure, X re-record; we add B (circle) = emergency stop, Start (options) = quit.
LAYOUTS = {
    "xbox":        {"stick_x": 0, "stick_y": 1, "stick_z": 4, "close": 2, "open": 5,
                    "intervene": 5, "success": 3, "failure": 0, "rerecord": 2, "estop": 1, "quit": 7},
    "playstation": {"stick_x": 0, "stick_y": 1, "stick_z": 3, "close": 4, "open": 5,
                    "intervene": 10, "success": 3, "failure": 0, "rerecord": 2, "estop": 1, "quit": 6},
}
AXES = ("stick_x", "stick_y", "stick_z", "close", "open")


def gamepad_layout(pad_name, layout="auto", remap=""):
    """The layout for a pad: by name unless `layout` names one, then `remap` ("name=number,...") on top."""
    if layout == "auto":   # SDL names the Sony pads it drives itself "PS4 Controller" / "PS5 Controller"
        layout = "playstation" if "PS4" in pad_name or "PS5" in pad_name else "xbox"
    controls = dict(LAYOUTS[layout])
    for item in filter(None, remap.split(",")):
        name, _, number = item.partition("=")
        if name.strip() not in controls or not number.strip().isdigit():
            raise ValueError(f"--gamepad_map {item!r}: expected name=number "
                             f"with name one of {', '.join(controls)}")
        controls[name.strip()] = int(number)
    return controls


def gamepad_action(axes, buttons, layout, zone, speed):
    """Raw pygame axes (-1..1) and buttons (0/1) -> (act, held). Pure: no device, no state."""
    sticks = np.array([-axes[layout["stick_y"]], -axes[layout["stick_x"]], -axes[layout["stick_z"]]])
    sticks = np.sign(sticks) * np.maximum(np.abs(sticks) - zone, 0.0) / (1.0 - zone)   # no jump at the edge
    held = {name for name, number in layout.items() if name not in AXES and buttons[number]}
    held |= {name for name in ("close", "open") if axes[layout[name]] > 0.5}   # past half-way
    gripper = ("open" in held) - ("close" in held)   # -1 close, +1 open, 0 stay (hil-serl); both: stay
    return np.append(np.clip(speed * sticks, -1, 1), gripper).astype(np.float32), held


# --- devices: each turns its input into (act, held) ---------------------------------------------------
def has_display():
    """True where a window can open: Windows, macOS, or X11/Wayland with a display set."""
    if os.environ.get("SDL_VIDEODRIVER") in ("dummy", "offscreen"):
        return False
    return (sys.platform in ("win32", "darwin")
            or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")))


def start_pygame():
    """pygame with video (SDL needs it to pump joystick events), on the dummy driver when headless."""
    if not has_display():
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    # SAFETY: SDL drops pad input while its window lacks the focus; the pad (and its e-stop) must always work.
    os.environ.setdefault("SDL_JOYSTICK_ALLOW_BACKGROUND_EVENTS", "1")
    pygame.init()


class Gamepad:
    """The first pygame joystick, read through its layout."""

    def __init__(self, cfg):
        self.joystick = pygame.joystick.Joystick(0)
        self.name = self.joystick.get_name()
        self.layout = gamepad_layout(self.name, cfg.gamepad_layout, cfg.gamepad_map)
        self.zone, self.speed = cfg.dead_zone, cfg.teleop_speed
        counts = {"axis": self.joystick.get_numaxes(), "button": self.joystick.get_numbuttons()}
        for name, number in self.layout.items():
            kind = "axis" if name in AXES else "button"
            if number >= counts[kind]:
                raise ValueError(f"gamepad '{self.name}' has {counts[kind]} {kind}s but '{name}' is {kind} "
                                 f"{number}; remap with --gamepad_map {name}=N "
                                 "(python -m pygame.examples.joystick shows the numbers)")

    def read(self, obs):
        axes = [self.joystick.get_axis(i) for i in range(self.joystick.get_numaxes())]
        buttons = [self.joystick.get_button(i) for i in range(self.joystick.get_numbuttons())]
        return gamepad_action(axes, buttons, self.layout, self.zone, self.speed)


class Keys:
    """The buttons on keys, in a small window that needs the focus: for a leader arm without a gamepad."""

    KEYS = {"intervene": pygame.K_SPACE, "success": pygame.K_RETURN, "failure": pygame.K_BACKSPACE,
            "rerecord": pygame.K_r, "estop": pygame.K_ESCAPE, "quit": pygame.K_q}

    def __init__(self):
        if pygame.display.get_surface() is None:
            pygame.display.set_mode((480, 40))

    def read(self, obs):
        pressed = pygame.key.get_pressed()
        return np.zeros(ACT_DIM, np.float32), {name for name, key in self.KEYS.items() if pressed[key]}


class VirtualOperator:
    """The virtual arm's scripted operator (python sim.py serve) as the human, to rehearse without arm or pad:
    asked over HTTP with the state at each read, it drives, presses buttons and resets the scene."""

    def __init__(self, cfg):
        self.url, self.reset_pending = f"http://127.0.0.1:{cfg.serve_http_port}/operator", True

    def reset(self):
        self.reset_pending = True

    def read(self, obs):
        query = ("state=" + ",".join(f"{v:.6f}" for v in obs["state"])
                 + ("&reset=1" if self.reset_pending else ""))
        self.reset_pending = False
        with urllib.request.urlopen(f"{self.url}?{query}") as reply:
            answer = json.loads(reply.read())
        return np.array(answer["act"], np.float32), set(answer["held"])


class LeaderArm:
    """An SO-101 leader arm on a second bus. While intervene is held, the follower's tool follows the leader
    tool's motion since the press, not its pose, so taking over never lurches: that motion, in EE-delta units
    clipped to [-1, 1], is the action env.step runs and stores. Position only: the IK keeps the gripper down.
    While the policy acts, the leader tracks the follower (weak torque): there when taken."""

    TRACKING_TORQUE = 150   # Torque_Limit (0.1 % of stall) while tracking: a hand overrides it easily

    def __init__(self, cfg, port=None):
        bus = (open_bus(cfg.leader_port, cfg) if port is None   # port: a test's emulated link
               else FeetechBus(port, cfg.baudrate, cfg.read_retries, cfg.bus_latency_s))
        self.arm = SO101(bus, load_calibration(cfg.leader_calibration), cfg.max_joint_step_rad)
        self.arm.connect()
        self.arm.configure()   # SAFETY: leaves the torque off
        for servo_id in IDS:
            bus.write(servo_id, "Torque_Limit", self.TRACKING_TORQUE)
        atexit.register(self.arm.close)   # SAFETY: torque off when the program ends, however it ends
        self.ee_step_m, self.anchor, self.tracking = cfg.ee_step_m, None, False

    def action(self, obs, intervening):
        leader = self.arm.read_joints()   # 5 rad + gripper; also where the goals' jump limit counts from
        tool, follower = forward_kinematics(leader[:5])[0], forward_kinematics(obs["state"][:5])[0]
        if not intervening:   # the policy acts: the leader follows the follower's joints
            if not self.tracking:
                self.arm.torque(True)
            self.anchor, self.tracking = None, True
            self.arm.write_joints(obs["state"][:6])
            return np.zeros(ACT_DIM, np.float32)
        if self.anchor is None:   # the press: free the leader; from here on the follower moves as it does
            self.arm.torque(False)
            self.anchor, self.tracking = tool - follower, False
        moved = np.clip((tool - self.anchor - follower) / self.ee_step_m, -1, 1)
        gripper = float(obs["state"][5] < 0.5) - float(leader[5] < 0.5)   # a change only: -1 close, +1 open
        return np.append(moved, gripper).astype(np.float32)


# --- what the loop asks every step ------------------------------------------------------------------------
class EmergencyStop(Exception):
    """Raised by Teleop after the emergency-stop button turned the torque off."""


class Teleop:
    """One question per step: is the human acting now, and with what action. `device` gives the action and the
    buttons; a `leader` arm, if any, gives the action instead (the buttons still come from the gamepad or
    keys). `torque_off` is called the moment emergency stop is pressed. Reads are >= `period_s` apart."""

    def __init__(self, device, leader=None, torque_off=None, period_s=0.0):
        start_pygame()   # SDL delivers the devices' input
        self.device, self.leader, self.torque_off = device, leader, torque_off
        self.held = set()   # the controls held at the last read
        self.period_s, self.next_s = period_s, 0.0

    def reset(self):
        """Call at every env.reset: the scripted expert forgets its history (other devices keep none)."""
        if hasattr(self.device, "reset"):
            self.device.reset()

    def read(self, obs):
        """The human's action whether or not they intervene -> (act, intervene held, new events)."""
        time.sleep(max(0.0, self.next_s - time.perf_counter()))   # a human needs real time, in the sim too
        self.next_s = time.perf_counter() + self.period_s
        window_closed = any(event.type == pygame.QUIT for event in pygame.event.get())  # SDL pumps input here
        act, held = self.device.read(obs)
        held |= {"quit"} if window_closed else set()   # closing the keys' window counts as quit
        events = {name for name in EVENTS if name in held and name not in self.held}
        self.held = held
        if "estop" in events:
            if self.torque_off is not None:
                self.torque_off()   # SAFETY: first, before anything else can send a goal
            raise EmergencyStop("emergency stop pressed: torque is off; move the arm by hand to a safe pose")
        if self.leader is not None:
            act = self.leader.action(obs, "intervene" in held)
        return act, "intervene" in held, events

    def poll(self, policy_act, obs):
        """-> (act to execute and store, intervened, events). While intervene is held the human acts."""
        act, intervened, events = self.read(obs)
        return (act if intervened else np.asarray(policy_act, np.float32)), intervened, events


class StatusLine:
    """The operator's line after each episode: its steps, return and interventions, and the recent rates."""

    def __init__(self, recent=20):
        self.successes, self.interventions = [], []   # one per episode ended: success, share of human steps
        self.steps, self.ret, self.human_steps = 0, 0.0, 0   # of the episode under way
        self.episode, self.recent = 1, recent                # its number: hilserl.py sets it on a resume

    def count(self, human, rew):
        self.steps, self.ret, self.human_steps = self.steps + 1, self.ret + rew, self.human_steps + human

    def end_episode(self, success, extra=""):
        """Print the episode's line (with `extra` at its end) and start counting the next one."""
        rate = self.human_steps / max(self.steps, 1)
        self.successes.append(float(success))
        self.interventions.append(rate)
        successes, interventions = self.successes[-self.recent:], self.interventions[-self.recent:]
        print(f"episode {self.episode:4d}  steps {self.steps:3d}  return {self.ret:7.2f}  success "
              f"{'yes' if success else 'no '}  intervened {rate:4.0%}  |  last {len(successes)}: success "
              f"{np.mean(successes):4.0%}  intervened {np.mean(interventions):4.0%}{extra}", flush=True)
        self.episode, self.steps, self.ret, self.human_steps = self.episode + 1, 0, 0.0, 0


# --- building it -------------------------------------------------------------------------------------------
def make_env(cfg, seed=None):
    """The real SO-101 on cfg.port, or the simulated one without a port."""
    if not cfg.port:
        from sim import make_sim
        return SO101Env(cfg, *make_sim(cfg, seed))
    arm = SO101(open_bus(cfg.port, cfg), load_calibration(cfg.calibration), cfg.max_joint_step_rad)
    arm.connect()
    arm.configure()
    return SO101Env(cfg, arm, make_cameras(cfg) if cfg.use_images else {}, RealWorld(cfg))


def make_teleop(cfg, env):
    """The device cfg.teleop names. auto: the leader arm if cfg.leader_port, else the scripted expert
    in the sim, else the gamepad. A leader arm takes its buttons from a gamepad, or from keys."""
    start_pygame()
    choice = cfg.teleop
    if choice == "auto":
        choice = "leader" if cfg.leader_port else "expert" if not cfg.port else "gamepad"
    if choice == "expert":
        if cfg.port:
            raise ValueError("--teleop expert: the scripted expert only exists in the sim; drop --port")
        from sim import ScriptedExpert   # lazily: only the sim has one
        return Teleop(ScriptedExpert(cfg, env.world, cfg.seed))
    if choice == "virtual":
        if not cfg.port:   # its operator moves the virtual arm's own twin, which only answers on its port
            raise ValueError("--teleop virtual: the virtual arm's operator needs its arm; start python "
                             "sim.py serve and pass the --port it prints")
        device = VirtualOperator(cfg)
    elif pygame.joystick.get_count():
        device = Gamepad(cfg)
        print(f"gamepad '{device.name}': layout {device.layout}")
    elif choice == "leader" and has_display():
        device = Keys()
    else:
        raise ValueError("no gamepad found: plug one in "
                         "(a leader arm without one needs a display for its keys)")
    leader = LeaderArm(cfg) if choice == "leader" else None
    return Teleop(device, leader, torque_off=env.arm.close, period_s=1.0 / cfg.control_hz)


# --- recording demos ---------------------------------------------------------------------------------------
def record_episode(env, teleop, status, obs):
    """The human (or the expert) drives every step of one episode -> (transitions, outcome: success, failure,
    rerecord or quit). On a real arm the success button makes the next step terminal; failure ends it now."""
    transitions = []
    while True:
        act, _, events = teleop.read(obs)
        if "quit" in events or "rerecord" in events:
            return transitions, "quit" if "quit" in events else "rerecord"
        if "failure" in events and transitions:
            transitions[-1] = (*transitions[-1][:5], True, *transitions[-1][6:])   # truncated by the human
            status.end_episode(False)
            return transitions, "failure"
        if "success" in events and isinstance(env.world, RealWorld):
            env.world.succeeded = True
        next_obs, rew, terminated, truncated, info = env.step(act)
        transitions.append((obs, act, rew, next_obs, terminated, truncated, True, info["grasp_penalty"]))
        status.count(True, rew)
        obs = next_obs
        if terminated or truncated:
            status.end_episode(info["success"])
            return transitions, "success" if info["success"] else "failure"


def wait_for_start(teleop, env, obs):
    """Real arm: the human resets the scene, then presses intervene -> the first observation (None: quit)."""
    print("reset the scene, then press intervene (RB/R1, or space) to start the episode", flush=True)
    teleop.reset()
    released = False   # a press, not a button still held from the last episode
    while True:
        _, intervene, events = teleop.read(obs)
        if "quit" in events:
            return None
        if intervene and released:
            return env.observe()
        released = released or not intervene


def record_demos(cfg, path, episodes):
    """Record until `path` holds `episodes` episodes (successes, unless cfg.demo_keep_failed) -> how many it
    holds. Saved atomically after each: a stop loses at most the episode under way; a rerun continues."""
    writable(path)   # before the first episode: a human's demo must not be lost to a path
    with make_env(cfg, cfg.seed) as env:
        teleop, status = make_teleop(cfg, env), StatusLine()
        obs = env.reset()
        demos = ReplayBuffer(cfg.demo_capacity, obs, ACT_DIM)
        if os.path.exists(path):
            demos.load(path)
        continued, failures = demos.num_episodes > 0, 0   # failures in a row
        while demos.num_episodes < episodes:
            if continued:   # the sim's scenes seeded per kept episode and try: none the file holds comes back
                obs = env.reset(seed=cfg.seed + 1000 * (demos.num_episodes + 1) + failures)
            if cfg.port and (obs := wait_for_start(teleop, env, obs)) is None:
                break
            transitions, outcome = record_episode(env, teleop, status, obs)
            if outcome == "quit":
                break
            if outcome == "success" or (outcome == "failure" and cfg.demo_keep_failed):
                for transition in transitions:
                    demos.add(*transition)
                demos.save(path)
                failures = 0
                print(f"{path}: {demos.num_episodes}/{episodes} episodes", flush=True)
            elif (failures := failures + 1) >= cfg.demo_max_failures:
                raise SystemExit(f"error: {failures} episodes in a row failed, so recording stopped; {path} "
                                 f"keeps its {demos.num_episodes} episodes (too short an --episode_steps "
                                 f"{cfg.episode_steps}?)")
            obs = env.reset()
            teleop.reset()
    return demos.num_episodes


# --- labelled frames for the reward classifier --------------------------------------------------------------
def label_frames(cfg, path, success_frames):
    """Record frames labelled success or not until `path` holds `success_frames` successes (hil-serl's
    record_success_fail.py) -> how many it holds. Frames while the human holds success (Y, Enter), the scene
    showing success (cube held up), are positives; show both kinds in many poses: the classifier learns only
    what it sees. In the sim the expert drives and physics labels. Episodes: cfg.episode_steps (failure ends
    one early), 5 at least (classifier.py tests every fifth), each saved atomically; a rerun adds more."""
    cfg.use_images = True
    writable(path)
    with make_env(cfg, cfg.seed) as env:
        teleop, status = make_teleop(cfg, env), StatusLine()
        obs = env.reset()
        cameras = [k for k, v in obs.items() if v.dtype == np.uint8]
        recorded = {k: [] for k in cameras + ["success", "episode"]}   # a list of arrays each, file's first
        if os.path.exists(path):
            saved = read_npz(path)
            if sorted(saved) != sorted(recorded) or any(saved[k].shape[1:] != obs[k].shape for k in cameras):
                raise ValueError(f"{path}: frames of other cameras or another size; "
                                 "label into another --frames file")
            recorded = {k: [v] for k, v in saved.items()}
        positives = int(recorded["success"][0].sum()) if recorded["success"] else 0
        episode = int(recorded["episode"][0].max()) + 1 if recorded["episode"] else 0
        events, failures = set(), 0   # failures: episodes in a row without a success frame
        while (positives < success_frames or episode < 5) and "quit" not in events:  # 5: one to test
            if cfg.port and (obs := wait_for_start(teleop, env, obs)) is None:
                break
            observed, labels = [], []
            for _ in range(cfg.episode_steps):
                act, _, events = teleop.read(obs)
                if events & {"quit", "failure", "rerecord"}:
                    break
                obs = env.step(act)[0]
                observed.append(obs)
                labels.append("success" in teleop.held or bool(env.world.success()))   # the sim: its physics
                status.count(True, float(labels[-1]))
            if labels and "rerecord" not in events:   # re-record: the human mislabelled; drop the episode
                positives += sum(labels)
                for k in cameras:
                    recorded[k].append(np.stack([o[k] for o in observed]))
                recorded["success"].append(np.array(labels))
                recorded["episode"].append(np.full(len(labels), episode))
                save_npz(path, {k: np.concatenate(v) for k, v in recorded.items()})
                status.end_episode(any(labels), f"  |  {path}: {positives}/{success_frames} success frames")
                episode += 1
            if (failures := 0 if any(labels) else failures + 1) >= cfg.demo_max_failures:
                raise ValueError(f"{failures} episodes in a row showed no success, so labelling stopped; "
                                 f"{path} keeps its {positives} success frames (too short an --episode_steps "
                                 f"{cfg.episode_steps}?)")
            obs = env.reset()
            teleop.reset()
    return positives


# --- demos from a LeRobot dataset ---------------------------------------------------------------------------
# A LeRobot dataset (v3.0 or v2.1) holds the follower's joints and videos, no EE motion, no success. We take
# every episode as a success, the EE action as the motion the arm made (FK), not its command (servos lag).
LEROBOT_ROBOTS = ("so101", "so101_follower", "so_follower")   # so_follower (#2763): SO-100 too; can't tell
GRIPPER_MOVED = 0.02   # an opening (0..1) change past it is a command; less: encoder noise, a grip's creep


def lerobot_to_ticks(values, calibration, use_degrees):
    """LeRobot's so101_follower joint values (N, 6) -> servo ticks (N, 6), undoing its MotorsBus._normalize:
    arm joints in degrees, (ticks - (min + max) / 2) * 360 / 4095, or without use_degrees -100 at range_min to
    +100 at range_max; the gripper 0 to 100 over its range (drive_mode, a mirror, is 0 for SO-101s)."""
    low, high = np.array([[calibration[name].range_min, calibration[name].range_max]
                          for name in JOINTS], float).T
    ticks = ((low + high) / 2 + values * 4095 / 360 if use_degrees
             else low + (values + 100) / 200 * (high - low))
    ticks[:, 5] = low[5] + values[:, 5] / 100 * (high[5] - low[5])
    return ticks


def lerobot_frames(video, times_s, roi, size, tolerance_s):
    """The frames of `video` at times_s (seconds, rising), cropped and resized as robot.py's cameras do."""
    import av
    frames = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        container.seek(int(times_s[0] / stream.time_base), stream=stream)  # decode from the keyframe before
        for frame in container.decode(stream):
            if frame.time > times_s[len(frames)] - tolerance_s:
                frames.append(process_frame(frame.to_ndarray(format="bgr24"), roi, size))
                if len(frames) == len(times_s):
                    return np.stack(frames)
    raise ValueError(f"{video}: ends before {times_s[len(frames)]:.3f} s, "
                     "a frame the dataset needs; it is incomplete")


def add_lerobot_episode(cfg, demos, index, joints, frames):
    """Episode `index`'s kept joints (T + 1, 6), frames {camera: (T + 1, H, W, 3)} -> `demos` as a success."""
    ee = np.array([forward_kinematics(q[:5])[0] for q in joints])   # (T + 1, 3)
    moved = np.diff(ee, axis=0) / cfg.ee_step_m   # (T, 3)
    opening = np.diff(joints[:, 5])   # (T,)
    command = np.sign(opening) * (np.abs(opening) > GRIPPER_MOVED)   # -1 close, 0 stay, +1 open
    act = np.column_stack([np.clip(moved, -1, 1), command]).astype(np.float32)   # clipped: a policy's range
    state = np.column_stack([joints, ee - ee[0]]).astype(np.float32)   # (T + 1, 6 + 3), as SO101Env observes
    obs = [{"state": state[t], **{name: f[t] for name, f in frames.items()}} for t in range(len(joints))]
    target = float(joints[0, 5] >= 0.5)   # the gripper as the episode found it (SO101Env.reset would open it)
    for t in range(len(act)):
        penalty = cfg.grasp_penalty if command[t] and (command[t] > 0) != target else 0.0  # as SO101Env.step
        target = float(command[t] > 0) if command[t] else target
        last = t == len(act) - 1   # every episode a success
        rew = cfg.reward_success if last else cfg.reward_step
        demos.add(obs[t], act[t], rew, obs[t + 1], last, False, True, penalty)
    path_mm = 1000 * cfg.ee_step_m * np.linalg.norm(moved, axis=1).sum()
    lost_mm = path_mm - 1000 * cfg.ee_step_m * np.linalg.norm(act[:, :EE_DIM], axis=1).sum()
    print(f"episode {index}: {len(act)} steps, {np.mean(np.abs(moved).max(1) > 1):.0%} clipped to ±1, "
          f"{lost_mm:.0f} of its {path_mm:.0f} mm EE path lost to the clip")


def import_lerobot(cfg, folder, path):
    """An SO-101 follower's LeRobot dataset -> demo file `path`, as record_demos writes it -> its episodes."""
    try:   # this command's extra: pip install -r requirements-lerobot.txt
        importlib.import_module("av")   # only to check it is there: lerobot_frames decodes with it (AV1 too)
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("import-lerobot needs pyarrow and av: "
                         "pip install -r requirements-lerobot.txt") from None
    root, info_path = pathlib.Path(folder), pathlib.Path(folder, "meta", "info.json")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{info_path}: missing or not JSON; pass a LeRobot dataset's folder") from None
    wanted = {   # field by field: a dataset of another writer, or a damaged one, is named, not a traceback
        "codebase_version": (lambda v: isinstance(v, str) and v[:2] in ("v2", "v3"), "v2.x or v3.x"),
        "fps": (lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"),
        "features": (lambda v: isinstance(v, dict), "a mapping of feature names"),
        "video_path": (lambda v: isinstance(v, str) or not cfg.use_images, "a path pattern")}
    for key, (fits, want) in wanted.items():
        found = info.get(key) if isinstance(info, dict) else f"absent: the file holds {type(info).__name__}"
        if not isinstance(info, dict) or not fits(found):
            raise ValueError(f"{info_path}: {key} {found!r}, not {want}; is it a LeRobot dataset's info?")
    fps, features, v2 = info["fps"], info["features"], info["codebase_version"].startswith("v2")
    state = features.get("observation.state")
    names = state.get("names") if isinstance(state, dict) else None
    step = fps / cfg.control_hz   # dataset frames per control step
    cameras = parse_cameras(cfg.cameras, cfg.camera_roi) if cfg.use_images else {}
    videos = [key for key, feature in features.items() if feature.get("dtype") == "video"]
    missing = [f"observation.images.{name}" for name in cameras if f"observation.images.{name}" not in videos]
    data_files = sorted(root.glob("data/*/*.parquet"))
    refusals = (
        (info.get("robot_type") not in LEROBOT_ROBOTS, f"{info_path}: robot_type {info.get('robot_type')!r}: "
         f"only an SO-101 follower's ({', '.join(LEROBOT_ROBOTS)}) fits this arm's kinematics"),
        (step != round(step), f"{info_path}: fps {fps} is not a multiple of --control_hz {cfg.control_hz}: "
         f"record at another fps, or import and train with a --control_hz that divides {fps}"),
        (names != [f"{name}.pos" for name in JOINTS], f"{info_path}: observation.state's names are {names}, "
         "not the SO-101's"),
        (missing, f"{info_path}: no video {', '.join(missing)} (it has {', '.join(videos) or 'none'}): name "
         "--cameras as the dataset does, or pass --use_images false"),
        (not data_files, f"{root}: no data/*/*.parquet in it: the dataset is incomplete"),
        (not os.path.exists(cfg.calibration), f"--calibration {cfg.calibration}: no such file; pass the "
         "recording arm's (LeRobot keeps it in ~/.cache/huggingface/lerobot/calibration/robots/)"),
        (os.path.exists(path), f"--demos {path} exists: import into another file"))
    for refused, why in refusals:
        if refused:
            raise ValueError(why)
    calibration = load_calibration(cfg.calibration)
    try:   # pyarrow's own messages run to several lines
        table = pq.read_table(data_files, columns=["episode_index", "timestamp", "observation.state"])
        episode = table["episode_index"].to_numpy()
        time_s = table["timestamp"].to_numpy().astype(float)
        values = np.array(table["observation.state"].to_pylist(), float)   # (N, 6)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{root}/data: the columns episode_index, timestamp and observation.state do "
                         f"not read: {str(error).splitlines()[0]}") from None
    if values.shape[1:] != (6,):
        raise ValueError(f"{root}/data: observation.state holds {values.shape[1:]} numbers a frame, "
                         "not the SO-101's 6")
    ticks = lerobot_to_ticks(values, calibration, cfg.lerobot_use_degrees)
    bad = np.flatnonzero(~np.all((ticks >= 0) & (ticks <= 4095), axis=1))   # NaN is never in range
    if len(bad):   # no STS3215 encoder reads it: other units, another arm's calibration, or damage
        raise ValueError(f"{root}/data: episode {episode[bad[0]]} at {time_s[bad[0]]:.2f} s (and "
                         f"{len(bad) - 1} more frames): observation.state {values[bad[0]].tolist()} is off "
                         f"the servos' 0-4095 ticks under {cfg.calibration}; check --calibration and "
                         "--lerobot_use_degrees")
    meta_files = sorted(root.glob("meta/episodes/*/*.parquet")) if cameras and not v2 else []
    where = {row["episode_index"]: row for row in pq.read_table(meta_files).to_pylist()} if meta_files else {}
    example = {"state": np.zeros(6 + EE_DIM, np.float32),
               **{name: np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8) for name in cameras}}
    demos = ReplayBuffer(len(episode) + 1, example, ACT_DIM)   # a slot for every frame: it never wraps
    for index in np.unique(episode).tolist():
        rows = np.flatnonzero(episode == index)[::round(step)]   # at control_hz, from the first frame
        if len(rows) < 2:
            print(f"episode {index}: shorter than a step at --control_hz {cfg.control_hz}, left out")
            continue
        joints = np.array([ticks_to_joints(t, calibration) for t in ticks[rows]])  # (T + 1, 5 rad + gripper)
        frames = {}
        for name, (_, roi) in cameras.items():   # v2.1: a video per episode; v3.0: meta/episodes locates it
            key, meta = f"observation.images.{name}", where.get(index, {})
            video = info["video_path"].format(
                video_key=key, episode_index=index, episode_chunk=index // info.get("chunks_size", 1000),
                **{k: meta.get(f"videos/{key}/{k}") for k in ("chunk_index", "file_index")})
            times_s = meta.get(f"videos/{key}/from_timestamp", 0.0) + time_s[rows]
            frames[name] = lerobot_frames(root / video, times_s, roi, cfg.image_size, 0.5 / fps)
        add_lerobot_episode(cfg, demos, index, joints, frames)
    if not demos.num_episodes:
        raise ValueError(f"{root}: no episode is longer than a control step at --control_hz "
                         f"{cfg.control_hz}; nothing written to {path}")
    demos.save(path)
    return demos.num_episodes


# --- command line ------------------------------------------------------------------------------------------
def main():
    cfg, words = load_config()
    try:
        if words == ["record"]:
            print(f"{cfg.demos}: {record_demos(cfg, cfg.demos, cfg.demo_episodes)} episodes")
        elif words == ["label"]:
            print(f"{cfg.frames}: {label_frames(cfg, cfg.frames, cfg.success_frames)} success frames")
        elif words[:1] == ["import-lerobot"] and len(words) == 2:
            print(f"{cfg.demos}: {import_lerobot(cfg, words[1], cfg.demos)} episodes")
        else:
            raise SystemExit("usage: python teleop.py record [--demos PATH --demo_episodes N --port PORT] "
                             "| label [--frames PATH --success_frames N --port PORT] "
                             "| import-lerobot DATASET_DIR [--demos PATH --calibration FILE "
                             "--lerobot_use_degrees false] (each episode: a success)")
    except (ValueError, OSError, RobotError, EmergencyStop) as error:   # one line a user can act on
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
