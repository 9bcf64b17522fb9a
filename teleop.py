"""The human in the loop: gamepad, keyboard or leader arm -> intervention action and episode events.

Place in the loop: before every env.step, the loop asks `teleop.poll(policy_act, obs)` whether the
human is acting now and with what action. While the intervene button is held (RB, as in LeRobot;
hil-serl's SpaceMouse intervenes on any motion), the human's action replaces the policy's and the
transition is stored with intervened=True, which sends it to the demo buffer too. Button presses
become events: success, failure, re-record, emergency stop (torque off at once), quit.

The same file records demos (`python teleop.py --record data/demos.npz --episodes 20`): the human
drives every step on the real arm; in the sim the scripted expert stands in for the human.

Every device turns its raw input into the same thing, (act, held): act is the policy's action
(float32 (4,): EE delta x, y, z in [-1, 1], gripper -1 close / 0 stay / +1 open) and held is the
set of control names held down right now. The mapping from raw axes and buttons is a pure
function, so it is tested without a device.

Axes of the base frame, as seen standing behind the arm: +x away from the base, +y to the left,
+z up. Left stick up = +x, left stick left = +y, right stick up = +z.
"""

import os
import sys
import time

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
import numpy as np
import pygame

from buffer import ReplayBuffer
from config import load_config

ACT_DIM = 4
EVENTS = ("success", "failure", "rerecord", "estop", "quit")   # pressed once, acted on once

# --- gamepad: layouts and the pure mapping ---------------------------------------------------------
# Axis and button numbers as pygame 2 documents them ("Common Controller Axis Mappings") for the
# "Xbox 360 Controller" and the "PS4 Controller"; SDL gives other pads one of these two numberings.
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
    if layout not in LAYOUTS:
        raise ValueError(f"--gamepad_layout {layout!r}: expected auto, {', '.join(LAYOUTS)}")
    controls = dict(LAYOUTS[layout])
    for item in filter(None, remap.split(",")):
        name, _, number = item.partition("=")
        if name.strip() not in controls or not number.strip().isdigit():
            raise ValueError(f"--gamepad_map {item!r}: expected name=number with name one of {', '.join(controls)}")
        controls[name.strip()] = int(number)
    return controls


def dead_zone(value, zone):
    """0 inside the dead zone, then rising linearly to +-1 at full deflection (no jump at the edge)."""
    return float(np.sign(value) * max(abs(value) - zone, 0.0) / (1.0 - zone))


def gamepad_action(axes, buttons, layout, zone, speed):
    """Raw pygame axes (-1..1) and buttons (0/1) -> (act, held). Pure: no device, no state."""
    def stick(name):
        return dead_zone(axes[layout[name]], zone)
    act = np.zeros(ACT_DIM, np.float32)
    act[:3] = np.clip(speed * np.array([-stick("stick_y"), -stick("stick_x"), -stick("stick_z")]), -1, 1)
    held = {name for name, number in layout.items() if name not in AXES and buttons[number]}
    held |= {name for name in ("close", "open") if axes[layout[name]] > TRIGGER_PRESSED}
    act[3] = gripper_command(held)
    return act, held


def gripper_command(held):
    """-1 close, +1 open, 0 stay (hil-serl's coding); both at once means stay."""
    return float(("open" in held) - ("close" in held))


# --- keyboard: the same controls on keys (needs the operator's window to have focus) -------------------
KEYS = {"x+": pygame.K_UP, "x-": pygame.K_DOWN, "y+": pygame.K_LEFT, "y-": pygame.K_RIGHT,
        "z+": pygame.K_w, "z-": pygame.K_s, "close": pygame.K_c, "open": pygame.K_o,
        "intervene": pygame.K_SPACE, "success": pygame.K_RETURN, "failure": pygame.K_BACKSPACE,
        "rerecord": pygame.K_r, "estop": pygame.K_ESCAPE, "quit": pygame.K_q}


def keyboard_action(pressed, speed):
    """Set of pressed pygame key codes -> (act, held). Pure, like gamepad_action."""
    held = {name for name, key in KEYS.items() if key in pressed}
    act = np.zeros(ACT_DIM, np.float32)
    for i, axis in enumerate("xyz"):
        act[i] = speed * ((axis + "+" in held) - (axis + "-" in held))
    act[3] = gripper_command(held)
    return act, held - {"x+", "x-", "y+", "y-", "z+", "z-"}


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
    pygame.init()


def pump():
    """Let SDL read its devices; the window's close button counts as quit."""
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
                                 f"remap with --gamepad_map {name}=N (python teleop.py pad shows the numbers)")

    def read(self, obs):
        quit_pressed = pump()
        axes = [self.joystick.get_axis(i) for i in range(self.joystick.get_numaxes())]
        buttons = [self.joystick.get_button(i) for i in range(self.joystick.get_numbuttons())]
        act, held = gamepad_action(axes, buttons, self.layout, self.zone, self.speed)
        return act, held | quit_pressed


class Keyboard:
    """The keys of KEYS, read from the operator's window (it must have the focus)."""

    def __init__(self, cfg):
        self.speed = cfg.teleop_speed

    def read(self, obs):
        quit_pressed = pump()
        state = pygame.key.get_pressed()
        act, held = keyboard_action({key for key in KEYS.values() if state[key]}, self.speed)
        return act, held | quit_pressed


# --- what the loop asks every step ------------------------------------------------------------------------
class EmergencyStop(Exception):
    """Raised by Teleop after the emergency-stop button turned the torque off."""


class Teleop:
    """One question per step: is the human acting now, and with what action.

    `device` gives the action and the buttons; a `leader` arm, when present, gives the action
    instead (the buttons still come from the gamepad or keyboard). `torque_off` is called the
    moment emergency stop is pressed.
    """

    def __init__(self, device, leader=None, torque_off=None):
        self.device, self.leader, self.torque_off = device, leader, torque_off
        self.previous = set()

    def read(self, obs):
        """The human's action whether or not they intervene -> (act, intervene held, new events)."""
        act, held = self.device.read(obs)
        events = {name for name in EVENTS if name in held and name not in self.previous}
        self.previous = held
        if "estop" in events:
            if self.torque_off is not None:
                self.torque_off()   # SAFETY: first, before anything else can send a goal
            raise EmergencyStop("emergency stop pressed: torque is off; move the arm by hand to a safe pose")
        if self.leader is not None:
            act = self.leader.action(obs)
        return act, "intervene" in held, events

    def poll(self, policy_act, obs):
        """-> (act to execute and store, intervened, events). While intervene is held the human acts."""
        act, intervened, events = self.read(obs)
        return (act if intervened else np.asarray(policy_act, np.float32)), intervened, events


# --- the operator's window ---------------------------------------------------------------------------------
class OperatorWindow:
    """Camera views, who is acting, episode, step, return, recent success and intervention rates.

    Drawn where a display exists (and cfg.show_window); every episode also prints one status line,
    which is all a headless run shows.
    """

    VIEW_PX = 256   # each camera view is drawn this many pixels wide and high

    def __init__(self, cfg, visible=None, recent=20):
        self.cfg = cfg
        self.visible = cfg.show_window and has_display() if visible is None else visible
        self.screen = None                 # opened on the first frame, sized to the cameras
        self.episode, self.steps, self.ret, self.human_steps = 1, 0, 0.0, 0
        self.successes, self.intervention_rates = [], []
        self.recent = recent

    def rates(self):
        """(recent success rate, recent intervention rate) over the last `recent` episodes."""
        s, i = self.successes[-self.recent:], self.intervention_rates[-self.recent:]
        return (float(np.mean(s)) if s else 0.0), (float(np.mean(i)) if i else 0.0)

    def show(self, obs, human, rew):
        """Count one step and, when visible, draw it."""
        self.steps, self.ret, self.human_steps = self.steps + 1, self.ret + rew, self.human_steps + human
        if self.visible:
            self.draw({k: v for k, v in obs.items() if v.dtype == np.uint8}, human)

    def end_episode(self, success):
        """Print the episode's status line and start counting the next one."""
        rate = self.human_steps / max(self.steps, 1)
        self.successes.append(float(success))
        self.intervention_rates.append(rate)
        recent_success, recent_intervention = self.rates()
        print(f"episode {self.episode:4d}  steps {self.steps:3d}  return {self.ret:7.2f}  "
              f"success {'yes' if success else 'no '}  intervened {rate:4.0%}  |  last {len(self.successes[-self.recent:])}: "
              f"success {recent_success:4.0%}  intervened {recent_intervention:4.0%}", flush=True)
        self.episode, self.steps, self.ret, self.human_steps = self.episode + 1, 0, 0.0, 0

    def draw(self, frames, human):
        size = self.VIEW_PX
        if self.screen is None:
            pygame.display.set_caption("hilserl-so101")
            self.screen = pygame.display.set_mode((max(size * len(frames), 2 * size), size + 150))
            self.fonts = pygame.font.Font(None, 44), pygame.font.Font(None, 24)
        big, small = self.fonts
        who, colour = ("HUMAN", (255, 140, 0)) if human else ("POLICY", (60, 200, 90))
        self.screen.fill((25, 25, 25))
        for i, (name, frame) in enumerate(frames.items()):
            view = pygame.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))
            self.screen.blit(pygame.transform.scale(view, (size, size)), (i * size, 0))
            self.screen.blit(small.render(name, True, (255, 255, 0)), (i * size + 6, 6))
        if not frames:
            self.screen.blit(small.render("no camera frames (run with --use_images true)", True, (200, 200, 200)), (10, 10))
        pygame.draw.rect(self.screen, colour, (0, 0, self.screen.get_width(), size), width=4)
        recent_success, recent_intervention = self.rates()
        self.screen.blit(big.render(who, True, colour), (10, size + 10))
        lines = (f"episode {self.episode}   step {self.steps}/{self.cfg.episode_steps}   return {self.ret:.2f}",
                 f"recent success {recent_success:.0%}   intervened {self.human_steps / max(self.steps, 1):.0%} "
                 f"this episode, {recent_intervention:.0%} recent",
                 "hold RB/R1 (space): take over   LT/RT (c/o): close/open gripper",
                 "Y success   A failure   X re-record   B E-STOP   Start quit")
        for row, text in enumerate(lines):
            x, y = (150, size + 20) if row == 0 else (10, size + 30 + 26 * row)
            self.screen.blit(small.render(text, True, (230, 230, 230)), (x, y))
        pygame.display.flip()

    def save(self, path):
        """Write what the window shows to an image file (PNG by its extension)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pygame.image.save(self.screen, path)
