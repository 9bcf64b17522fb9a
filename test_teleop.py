"""Tests of teleop.py: the gamepad and keyboard mappings, interventions, the leader arm, demo recording.

No device is needed: SDL runs on its dummy drivers, the leader arm is robot.py's ServoEmulator.
"""

import os

os.environ["SDL_VIDEODRIVER"] = "dummy"
os.environ["SDL_AUDIODRIVER"] = "dummy"

import numpy as np
import pygame
import pytest

import teleop
from config import Config

XBOX, PS = teleop.LAYOUTS["xbox"], teleop.LAYOUTS["playstation"]


def pad(layout, axes=None, pressed=(), zone=0.1, speed=1.0):
    """Map a pad state given by control names, e.g. pad(XBOX, {"stick_y": -1.0}, ["intervene"])."""
    raw_axes = [0.0] * 6
    raw_axes[layout["close"]] = raw_axes[layout["open"]] = -1.0
    for name, value in (axes or {}).items():
        raw_axes[layout[name]] = value
    buttons = [0] * 16
    for name in pressed:
        buttons[layout[name]] = 1
    return teleop.gamepad_action(raw_axes, buttons, layout, zone, speed)


@pytest.mark.parametrize("layout", [XBOX, PS])
def test_sticks_move_the_end_effector_in_the_base_frame(layout):
    act, held = pad(layout, {"stick_y": -1.0, "stick_x": 1.0, "stick_z": -1.0})
    np.testing.assert_allclose(act, [1.0, -1.0, 1.0, 0.0])   # up = +x, right = -y, right stick up = +z
    assert held == set()


def test_layouts_read_the_numbers_pygame_documents():
    # Xbox 360: right stick vertical is axis 4, RB is button 5; PS4: axis 3 and R1 is button 10.
    axes = [0.0, 0.0, -1.0, 0.0, -1.0, -1.0]
    buttons = [0] * 16
    buttons[5] = 1
    xbox_act, xbox_held = teleop.gamepad_action(axes, buttons, XBOX, 0.1, 1.0)
    assert xbox_act[2] == 1.0 and "intervene" in xbox_held
    ps_act, ps_held = teleop.gamepad_action(axes, buttons, PS, 0.1, 1.0)
    assert ps_act[2] == 0.0 and "intervene" not in ps_held   # PS4 axis 4 is L2 and button 5 is PS


def test_layout_is_chosen_from_the_pad_name():
    assert teleop.gamepad_layout("Xbox 360 Controller") == XBOX
    assert teleop.gamepad_layout("PS4 Controller") == PS
    assert teleop.gamepad_layout("PS5 Controller") == PS
    assert teleop.gamepad_layout("Logitech Gamepad F310") == XBOX
    assert teleop.gamepad_layout("PS4 Controller", layout="xbox") == XBOX


def test_dead_zone_zeroes_small_deflections_and_rises_without_a_jump():
    assert pad(XBOX, {"stick_y": -0.09, "stick_x": 0.05, "stick_z": 0.1})[0][:3].tolist() == [0, 0, 0]
    just_past = pad(XBOX, {"stick_y": -0.11})[0][0]
    assert 0 < just_past < 0.02
    assert pad(XBOX, {"stick_y": -0.55})[0][0] == pytest.approx(0.5)


def test_speed_scales_the_action():
    assert pad(XBOX, {"stick_y": -1.0}, speed=0.3)[0][0] == pytest.approx(0.3)


def test_triggers_close_and_open_the_gripper():
    assert pad(XBOX, {"close": 1.0})[0][3] == -1.0
    assert pad(XBOX, {"open": 1.0})[0][3] == 1.0
    assert pad(XBOX, {"open": 0.2})[0][3] == 0.0            # not past half-way
    assert pad(XBOX, {"close": 1.0, "open": 1.0})[0][3] == 0.0


@pytest.mark.parametrize("layout", [XBOX, PS])
@pytest.mark.parametrize("button", ["intervene", "success", "failure", "rerecord", "estop", "quit"])
def test_each_button_is_reported_held(layout, button):
    assert pad(layout, pressed=[button])[1] == {button}


def test_remap_moves_a_control_and_rejects_unknown_names():
    layout = teleop.gamepad_layout("Xbox 360 Controller", remap="intervene=4, success=9")
    assert layout["intervene"] == 4 and layout["success"] == 9 and layout["failure"] == XBOX["failure"]
    with pytest.raises(ValueError, match="gamepad_map"):
        teleop.gamepad_layout("Xbox 360 Controller", remap="jump=3")
    with pytest.raises(ValueError, match="gamepad_layout"):
        teleop.gamepad_layout("Xbox 360 Controller", layout="nintendo")


def test_keyboard_gives_the_same_actions_and_controls():
    k = teleop.KEYS
    act, held = teleop.keyboard_action({k["x+"], k["y-"], k["z+"], k["close"], k["intervene"]}, speed=0.5)
    np.testing.assert_allclose(act, [0.5, -0.5, 0.5, -1.0])
    assert held == {"close", "intervene"}
    for name in teleop.EVENTS:
        assert teleop.keyboard_action({k[name]}, 1.0)[1] == {name}


class Scripted:
    """A device that replays (act, held) pairs, standing in for a gamepad."""

    def __init__(self, *steps):
        self.steps = list(steps)

    def read(self, obs):
        return self.steps.pop(0)


HUMAN = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
POLICY = np.array([0.0, 0.0, -1.0, 1.0], np.float32)


def test_the_human_acts_only_while_intervene_is_held():
    t = teleop.Teleop(Scripted((HUMAN, set()), (HUMAN, {"intervene"}), (HUMAN, {"intervene"}), (HUMAN, set())))
    acting = [t.poll(POLICY, None) for _ in range(4)]
    assert [intervened for _, intervened, _ in acting] == [False, True, True, False]
    for act, intervened, _ in acting:
        np.testing.assert_array_equal(act, HUMAN if intervened else POLICY)


def test_an_event_fires_once_per_press():
    t = teleop.Teleop(Scripted((HUMAN, {"success"}), (HUMAN, {"success"}), (HUMAN, set()), (HUMAN, {"success"})))
    assert [t.poll(POLICY, None)[2] for _ in range(4)] == [{"success"}, set(), set(), {"success"}]


def test_emergency_stop_turns_the_torque_off_and_stops_the_loop():
    calls = []
    t = teleop.Teleop(Scripted((HUMAN, {"intervene", "estop"})), torque_off=lambda: calls.append("off"))
    with pytest.raises(teleop.EmergencyStop):
        t.poll(POLICY, None)
    assert calls == ["off"]


def test_keyboard_device_reads_pygame_keys_under_the_dummy_driver():
    teleop.start_pygame()
    act, held = teleop.Keyboard(Config()).read(None)   # nothing is pressed on a dummy display
    np.testing.assert_array_equal(act, np.zeros(4))
    assert held == set()
    pygame.event.post(pygame.event.Event(pygame.QUIT))
    assert teleop.Keyboard(Config()).read(None)[1] == {"quit"}


def test_operator_window_renders_offscreen_and_prints_a_line_per_episode(tmp_path, capsys):
    teleop.start_pygame()
    window = teleop.OperatorWindow(Config(), visible=True)
    frame = np.zeros((64, 64, 3), np.uint8)
    for human in (True, False, False, True):
        window.show({"state": np.zeros(9, np.float32), "front": frame, "wrist": frame}, human, -0.05)
    window.end_episode(success=True)
    window.save(str(tmp_path / "window.png"))
    assert (tmp_path / "window.png").stat().st_size > 1000
    line = capsys.readouterr().out
    assert "episode    1" in line and "intervened  50%" in line and "success yes" in line
