"""The human in the loop: gamepad or leader arm -> intervention action and episode events.

Place in the loop: before every env.step, the loop asks `teleop.poll(policy_act, obs)` whether the
human is acting now and with what action. While the intervene button is held (RB, as in LeRobot;
hil-serl's SpaceMouse intervenes on any motion), the human's action replaces the policy's and the
transition is stored with intervened=True, which sends it to the demo buffer too. Button presses
become events: success, failure, re-record, emergency stop (torque off at once), quit.

Every device (gamepad, leader arm, or the sim's scripted expert standing in for the
human) gives the same two things: act, in the policy's action space (float32 (4,): EE delta x, y,
z in [-1, 1], gripper -1 close / 0 stay / +1 open), and held, the set of controls held down now.
Raw axes and buttons map to them in pure functions, tested without a device. Seen from behind the
arm: left stick up = +x (away from the base), left stick left = +y, right stick up = +z.

Commands: `python teleop.py record` records demos (cfg.demos, cfg.demo_episodes); `label` records
camera frames labelled success or not for the reward classifier (cfg.frames, cfg.success_frames).
"""

import atexit
import json
import os
import sys
import time
import urllib.request

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
import numpy as np
import pygame

from buffer import ReplayBuffer, read_npz, save_npz
from config import load_config
from robot import (ACT_DIM, IDS, SO101, FeetechBus, RealWorld, RobotError, SO101Env, forward_kinematics,
                   load_calibration, make_cameras, open_bus)

EVENTS = ("success", "failure", "rerecord", "estop", "quit")   # pressed once, acted on once

# --- gamepad: layouts and the pure mapping ---------------------------------------------------------
# Axis and button numbers as pygame 2 documents them ("Common Controller Axis Mappings") for the
# "Xbox 360 Controller" and the "PS4 Controller". Other pads and drivers may differ: pygame's
# `python -m pygame.examples.joystick` shows the numbers, --gamepad_map remaps.
# Triggers are axes that rest at -1. Controls as in LeRobot: hold RB (R1) to intervene, LT/RT close/open,
# Y success, A failure, X re-record; we add B (circle) = emergency stop, Start (options) = quit.
LAYOUTS = {
    "xbox":        {"stick_x": 0, "stick_y": 1, "stick_z": 4, "close": 2, "open": 5,
                    "intervene": 5, "success": 3, "failure": 0, "rerecord": 2, "estop": 1, "quit": 7},
    "playstation": {"stick_x": 0, "stick_y": 1, "stick_z": 3, "close": 4, "open": 5,
                    "intervene": 10, "success": 3, "failure": 0, "rerecord": 2, "estop": 1, "quit": 6},
}
AXES = ("stick_x", "stick_y", "stick_z", "close", "open")
TRIGGER_PRESSED = 0.5   # a trigger past half-way counts as pressed


def gamepad_layout(pad_name, layout="auto", remap=""):
    """The layout for a pad: by name unless `layout` names one, then `remap` ("name=number,...") on top."""
    if layout == "auto":   # SDL names the Sony pads it drives itself "PS4 Controller" / "PS5 Controller"
        layout = "playstation" if "PS4" in pad_name or "PS5" in pad_name else "xbox"
    controls = dict(LAYOUTS[layout])
    for item in filter(None, remap.split(",")):
        name, _, number = item.partition("=")
        if name.strip() not in controls or not number.strip().isdigit():
            raise ValueError(f"--gamepad_map {item!r}: expected name=number with name one of {', '.join(controls)}")
        controls[name.strip()] = int(number)
    return controls


def gamepad_action(axes, buttons, layout, zone, speed):
    """Raw pygame axes (-1..1) and buttons (0/1) -> (act, held). Pure: no device, no state."""
    sticks = np.array([-axes[layout["stick_y"]], -axes[layout["stick_x"]], -axes[layout["stick_z"]]])
    # Dead zone: 0 inside it, then rising linearly to 1 at full deflection (no jump at its edge).
    sticks = np.sign(sticks) * np.maximum(np.abs(sticks) - zone, 0.0) / (1.0 - zone)
    held = {name for name, number in layout.items() if name not in AXES and buttons[number]}
    held |= {name for name in ("close", "open") if axes[layout[name]] > TRIGGER_PRESSED}
    gripper = ("open" in held) - ("close" in held)   # -1 close, +1 open, 0 stay (hil-serl); both at once: stay
    return np.append(np.clip(speed * sticks, -1, 1), gripper).astype(np.float32), held


# --- devices: each turns its input into (act, held) ---------------------------------------------------
def has_display():
    """True where a window can open: Windows, macOS, or X11/Wayland with a display set."""
    if os.environ.get("SDL_VIDEODRIVER") in ("dummy", "offscreen"):
        return False
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def start_pygame():
    """pygame with video (SDL needs it to pump joystick events), on the dummy driver when headless."""
    if not has_display():
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    # SAFETY: SDL drops pad input while its window lacks the focus; the pad (and its e-stop) must always work.
    os.environ.setdefault("SDL_JOYSTICK_ALLOW_BACKGROUND_EVENTS", "1")
    pygame.init()


def pump():
    """Let SDL read its devices; closing the keys' window counts as quit."""
    return {"quit"} if any(event.type == pygame.QUIT for event in pygame.event.get()) else set()


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
                raise ValueError(f"gamepad '{self.name}' has {counts[kind]} {kind}s but '{name}' is {kind} {number}; "
                                 f"remap with --gamepad_map {name}=N (python -m pygame.examples.joystick shows the numbers)")

    def read(self, obs):
        axes = [self.joystick.get_axis(i) for i in range(self.joystick.get_numaxes())]
        buttons = [self.joystick.get_button(i) for i in range(self.joystick.get_numbuttons())]
        return gamepad_action(axes, buttons, self.layout, self.zone, self.speed)


class Keys:
    """The buttons on keys, for a leader arm without a gamepad: they arrive through a small window,
    which must have the focus. Moving the arm is the leader's job; act is zero."""

    KEYS = {"intervene": pygame.K_SPACE, "success": pygame.K_RETURN, "failure": pygame.K_BACKSPACE,
            "rerecord": pygame.K_r, "estop": pygame.K_ESCAPE, "quit": pygame.K_q}

    def __init__(self):
        if pygame.display.get_surface() is None:
            pygame.display.set_mode((480, 40))

    def read(self, obs):
        pressed = pygame.key.get_pressed()
        return np.zeros(ACT_DIM, np.float32), {name for name, key in self.KEYS.items() if pressed[key]}


class VirtualOperator:
    """The virtual arm's scripted operator (python sim.py serve) as the human, for rehearsing without an
    arm or a gamepad: asked over HTTP with the observed state at every read, it drives, presses the
    buttons and resets the scene there."""

    def __init__(self, cfg):
        self.url, self.reset_pending = f"http://127.0.0.1:{cfg.serve_http_port}/operator", True

    def reset(self):
        self.reset_pending = True

    def read(self, obs):
        query = "state=" + ",".join(f"{v:.6f}" for v in obs["state"]) + ("&reset=1" if self.reset_pending else "")
        self.reset_pending = False
        with urllib.request.urlopen(f"{self.url}?{query}") as reply:
            answer = json.loads(reply.read())
        return np.array(answer["act"], np.float32), set(answer["held"])


class LeaderArm:
    """An SO-101 leader arm on a second bus. While intervene is held, the follower's tool follows the
    leader tool's motion since the press, not its absolute pose, so taking over never lurches. The
    action is that motion in EE-delta units, clipped to [-1, 1], through the same env.step as the
    policy: the stored action is exactly the EE delta the follower was given. Only the position is
    followed: the IK keeps the gripper pointing down, whatever the leader's wrist. While the policy
    acts, the leader tracks the follower, weakly torqued, so it is where the follower is when taken.
    """

    TRACKING_TORQUE = 150   # Torque_Limit (0.1 % of stall) while tracking: a hand overrides it easily

    def __init__(self, cfg, port=None):
        bus = open_bus(cfg.leader_port, cfg) if port is None else FeetechBus(port, cfg.baudrate, cfg.read_retries, cfg.bus_latency_s)
        self.arm = SO101(bus, load_calibration(cfg.leader_calibration), cfg.max_joint_step_rad)
        self.arm.connect()
        self.arm.configure()   # SAFETY: leaves the torque off
        for servo_id in IDS:
            bus.write(servo_id, "Torque_Limit", self.TRACKING_TORQUE)
        atexit.register(self.arm.close)   # SAFETY: torque off when the program ends, however it ends
        self.ee_step_m, self.anchor, self.tracking = cfg.ee_step_m, None, False

    def action(self, obs, intervening):
        leader = self.arm.read_joints()   # 5 rad + gripper opening; also where the goals' jump limit counts from
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
        act = np.zeros(ACT_DIM, np.float32)
        act[:3] = np.clip((tool - self.anchor - follower) / self.ee_step_m, -1, 1)
        closed, follower_closed = leader[5] < 0.5, obs["state"][5] < 0.5
        act[3] = 0.0 if closed == follower_closed else (-1.0 if closed else 1.0)   # command only a change
        return act


# --- what the loop asks every step ------------------------------------------------------------------------
class EmergencyStop(Exception):
    """Raised by Teleop after the emergency-stop button turned the torque off."""


class Teleop:
    """One question per step: is the human acting now, and with what action.

    `device` gives the action and the buttons; a `leader` arm, when present, gives the action
    instead (the buttons still come from the gamepad, or from keys). `torque_off` is called the
    moment emergency stop is pressed. Reads are at least `period_s` apart.
    """

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
        # A human needs real time, also in the sim, which otherwise runs as fast as it can.
        time.sleep(max(0.0, self.next_s - time.perf_counter()))
        self.next_s = time.perf_counter() + self.period_s
        quit_pressed = pump()
        act, held = self.device.read(obs)
        held |= quit_pressed
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


# --- the operator's status line -----------------------------------------------------------------------
class StatusLine:
    """Counts each episode's steps, return and human steps, and prints one line per episode with the
    recent success and intervention rates: what the operator reads between episodes."""

    def __init__(self, recent=20):
        self.episode, self.steps, self.ret, self.human_steps = 1, 0, 0.0, 0
        self.successes, self.intervention_rates = [], []
        self.recent = recent

    def count(self, human, rew):
        self.steps, self.ret, self.human_steps = self.steps + 1, self.ret + rew, self.human_steps + human

    def end_episode(self, success, extra=""):
        """Print the episode's line (with `extra` at its end) and start counting the next one."""
        rate = self.human_steps / max(self.steps, 1)
        self.successes.append(float(success))
        self.intervention_rates.append(rate)
        recent_success, recent_intervention = (np.mean(x[-self.recent:]) for x in (self.successes, self.intervention_rates))
        print(f"episode {self.episode:4d}  steps {self.steps:3d}  return {self.ret:7.2f}  "
              f"success {'yes' if success else 'no '}  intervened {rate:4.0%}  |  last {len(self.successes[-self.recent:])}: "
              f"success {recent_success:4.0%}  intervened {recent_intervention:4.0%}{extra}", flush=True)
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
    if choice == "virtual":
        return Teleop(VirtualOperator(cfg), torque_off=env.arm.close, period_s=1.0 / cfg.control_hz)
    if choice == "expert":
        if cfg.port:
            raise ValueError("--teleop expert: the scripted expert only exists in the sim; drop --port")
        from sim import ScriptedExpert   # lazily: only the sim has one
        return Teleop(ScriptedExpert(cfg, env.world, cfg.seed))
    if pygame.joystick.get_count():
        device = Gamepad(cfg)
        print(f"gamepad '{device.name}': layout {device.layout}")
    elif choice == "leader" and has_display():
        device = Keys()
    else:
        raise ValueError("no gamepad found: plug one in (a leader arm without one needs a display for its keys)")
    leader = LeaderArm(cfg) if choice == "leader" else None
    return Teleop(device, leader, torque_off=env.arm.close, period_s=1.0 / cfg.control_hz)


# --- recording demos ---------------------------------------------------------------------------------------
def record_episode(env, teleop, status, obs):
    """One episode in which the human (or the expert) drives every step -> (transitions, outcome).

    outcome: "success", "failure", "rerecord" or "quit". On the real arm the human's success button
    makes the next step the successful, terminal one; failure ends the episode where it is.
    """
    transitions = []
    while True:
        act, _, events = teleop.read(obs)
        if "quit" in events or "rerecord" in events:
            return transitions, "quit" if "quit" in events else "rerecord"
        if "failure" in events and transitions:
            transitions[-1] = (*transitions[-1][:5], True, *transitions[-1][6:])   # truncated: the human ended it
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
    """Real arm: the human resets the scene, then presses intervene -> the scene as they left it, the
    episode's first observation (None if they quit instead)."""
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
    """Record until `path` holds `episodes` episodes; returns how many it holds.

    Only successful episodes are kept unless cfg.demo_keep_failed. The file is rewritten atomically
    after every kept episode, so a stop (Ctrl-C, a crash, a kill) loses at most the episode in
    progress, and running the command again continues where it stopped.
    """
    env = make_env(cfg, cfg.seed)
    with env:
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
                raise SystemExit(f"error: {failures} episodes in a row failed, so recording stopped; {path} keeps its "
                                 f"{demos.num_episodes} episodes (too short an --episode_steps {cfg.episode_steps}?)")
            obs = env.reset()
            teleop.reset()
    return demos.num_episodes


# --- labelled frames for the reward classifier ---------------------------------------------------------------
def label_frames(cfg, path, success_frames):
    """Record camera frames labelled success or not until `path` holds `success_frames` successes
    (hil-serl's record_success_fail.py); returns how many it holds.

    The human drives the arm and holds the success button (Y, Enter) while the scene shows success
    (the cube held up): those frames are positives, every other frame a negative. Show both sides
    in many poses; the classifier learns only what it sees. In the sim the expert drives and the
    physics labels. An episode lasts cfg.episode_steps (failure ends it early); the file is
    rewritten atomically after each, and running the command again adds to it. It labels 5 episodes
    at least: classifier.py holds every fifth out to test on.
    """
    cfg.use_images = True
    with make_env(cfg, cfg.seed) as env:
        teleop, status = make_teleop(cfg, env), StatusLine()
        obs = env.reset()
        cameras = [k for k, v in obs.items() if v.dtype == np.uint8]
        recorded = {}
        if os.path.exists(path):
            recorded = {k: [v] for k, v in read_npz(path).items()}
            if sorted(recorded) != sorted(cameras + ["episode", "success"]) or \
                    any(recorded[k][0].shape[1:] != obs[k].shape for k in cameras):
                raise ValueError(f"{path}: frames of other cameras or another size; label into another --frames file")
        positives = int(recorded["success"][0].sum()) if recorded else 0
        episode = int(recorded["episode"][0].max()) + 1 if recorded else 0
        events, failures = set(), 0   # failures: episodes in a row without a success frame
        while (positives < success_frames or episode < 5) and "quit" not in events:   # 5: one held out to test on
            if cfg.port and (obs := wait_for_start(teleop, env, obs)) is None:
                break
            frames, labels = {k: [] for k in cameras}, []
            for _ in range(cfg.episode_steps):
                act, _, events = teleop.read(obs)
                if events & {"quit", "failure", "rerecord"}:
                    break
                obs = env.step(act)[0]
                labels.append("success" in teleop.held or bool(env.world.success()))   # the sim: its physics
                for k in cameras:
                    frames[k].append(obs[k])
                status.count(True, float(labels[-1]))
            if labels and "rerecord" not in events:   # re-record: the human mislabelled; drop the episode
                positives += sum(labels)
                for k in cameras:
                    recorded.setdefault(k, []).append(np.stack(frames[k]))
                recorded.setdefault("success", []).append(np.array(labels))
                recorded.setdefault("episode", []).append(np.full(len(labels), episode))
                save_npz(path, {k: np.concatenate(v) for k, v in recorded.items()})
                status.end_episode(any(labels), f"  |  {path}: {positives}/{success_frames} success frames")
                episode += 1
            if (failures := 0 if any(labels) else failures + 1) >= cfg.demo_max_failures:
                raise ValueError(f"{failures} episodes in a row showed no success, so labelling stopped; {path} keeps "
                                 f"its {positives} success frames (too short an --episode_steps {cfg.episode_steps}?)")
            obs = env.reset()
            teleop.reset()
    return positives


# --- command line ------------------------------------------------------------------------------------------
def main():
    cfg, words = load_config()
    try:
        if words == ["record"]:
            print(f"{cfg.demos}: {record_demos(cfg, cfg.demos, cfg.demo_episodes)} episodes")
        elif words == ["label"]:
            print(f"{cfg.frames}: {label_frames(cfg, cfg.frames, cfg.success_frames)} success frames")
        else:
            raise SystemExit("usage: python teleop.py record [--demos PATH --demo_episodes N --port PORT] "
                             "| label [--frames PATH --success_frames N --port PORT]")
    except (ValueError, OSError, RobotError, EmergencyStop) as error:   # one line a user can act on
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
