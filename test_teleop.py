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


# --- the leader arm, against robot.py's servo emulator ---------------------------------------------------
def leader_at(tmp_path, joints):
    """A LeaderArm whose servos (an emulator) sit at `joints` (5 rad + gripper opening)."""
    from robot import IDS, ServoEmulator, chain_calibration, joints_to_ticks, save_calibration
    calibration = chain_calibration()
    save_calibration(tmp_path / "leader.json", calibration)
    emulator = ServoEmulator()
    for servo_id, ticks in zip(IDS, joints_to_ticks(joints, calibration)):
        emulator.set(servo_id, "Present_Position", int(ticks))
    return teleop.LeaderArm(Config(leader_calibration=str(tmp_path / "leader.json")), port=emulator), emulator


def test_leader_action_is_the_clipped_tool_difference_in_action_units(tmp_path):
    from robot import HOME_RAD, forward_kinematics
    cfg = Config()
    follower = np.append(HOME_RAD, [1.0, 0, 0, 0]).astype(np.float32)          # gripper open
    near = HOME_RAD + [0.0, 0.0, 0.0, 0.02, 0.0]                                  # a few mm away
    leader, _ = leader_at(tmp_path, np.append(near, 0.0))                         # leader gripper closed
    act = leader.action({"state": follower})
    expected = (forward_kinematics(near)[0] - forward_kinematics(HOME_RAD)[0]) / cfg.ee_step_m
    np.testing.assert_allclose(act[:3], expected, atol=0.05)                      # ticks quantise the pose
    assert act[3] == -1.0                                                         # close, the follower is open
    far, _ = leader_at(tmp_path, np.append(HOME_RAD + [0.3, 0.2, -0.2, 0.0, 0.0], 1.0))
    act = far.action({"state": follower})
    assert np.abs(act[:3]).max() == 1.0 and act[3] == 0.0                          # clipped; both open: stay


def test_follower_tracks_the_leader_only_while_intervene_is_held(tmp_path):
    from robot import HOME_RAD, SO101Env, forward_kinematics
    from sim import make_sim
    cfg = Config()
    pose = HOME_RAD + [0.3, 0.2, -0.2, 0.0, 0.0]
    leader, _ = leader_at(tmp_path, np.append(pose, 1.0))
    held = [(np.zeros(4, np.float32), set())] * 5 + [(np.zeros(4, np.float32), {"intervene"})] * 25
    t = teleop.Teleop(Scripted(*held), leader)
    env = SO101Env(cfg, *make_sim(cfg, seed=0))
    obs = start = env.reset()
    for step in range(30):
        act, intervened, _ = t.poll(np.zeros(4, np.float32), obs)
        assert intervened == (step >= 5)
        obs = env.step(act)[0]
        if step == 4:
            np.testing.assert_allclose(obs["state"][6:9], start["state"][6:9], atol=0.006)  # held (sags a few mm)
    gap = forward_kinematics(pose)[0] - forward_kinematics(obs["state"][:5])[0]
    assert np.linalg.norm(gap) < 0.01
    env.close()


# --- recording demos: stopping loses only the episode in progress -------------------------------------------
def record_cfg(**overrides):
    # Short episodes, every one kept, so the number of episodes on disk is known in advance.
    return Config(episode_steps=12, demo_keep_failed=True, show_window=False, **overrides)


def test_record_demos_with_the_expert_keeps_successful_episodes(tmp_path):
    from buffer import ReplayBuffer
    cfg = Config(show_window=False)
    path = str(tmp_path / "demos.npz")
    assert teleop.record_demos(cfg, path, episodes=2) == 2
    demos = ReplayBuffer(cfg.demo_capacity, {"state": np.zeros(12, np.float32)}, 4)
    demos.load(path)
    a = demos.arrays
    assert demos.num_episodes == 2 and a["terminated"].sum() == 2 and a["intervened"][a["valid"]].all()
    assert teleop.record_demos(cfg, path, episodes=3) == 3                          # a second run continues


def test_an_exception_mid_episode_leaves_the_finished_episodes_intact(tmp_path, monkeypatch):
    from buffer import ReplayBuffer
    from robot import SO101Env
    cfg, path = record_cfg(), str(tmp_path / "demos.npz")
    states, real_step = [], SO101Env.step

    def step_then_crash(env, act):
        if len(states) == 2 * cfg.episode_steps + 5:                               # 5 steps into episode 3
            raise RuntimeError("cable pulled")
        result = real_step(env, act)
        states.append(result[0]["state"])
        return result

    monkeypatch.setattr(SO101Env, "step", step_then_crash)
    with pytest.raises(RuntimeError, match="cable pulled"):
        teleop.record_demos(cfg, path, episodes=5)
    demos = ReplayBuffer(cfg.demo_capacity, {"state": states[0]}, 4)
    demos.load(path)
    assert demos.num_episodes == 2
    np.testing.assert_array_equal(demos.arrays["next_state"][demos.arrays["valid"]], states[:2 * cfg.episode_steps])


def test_a_killed_recording_leaves_the_finished_episodes_intact(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from buffer import ReplayBuffer
    path = tmp_path / "demos.npz"
    command = [sys.executable, "teleop.py", "record", "--demos", str(path), "--demo_episodes", "1000",
               "--episode_steps", "12", "--demo_keep_failed", "true", "--show_window", "false"]
    recorder = subprocess.Popen(command, cwd=os.path.dirname(os.path.abspath(__file__)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in recorder.stdout:                                           # "...demos.npz: 3/1000 episodes"
            if line.startswith(f"{path}: 3/"):
                break
        time.sleep(0.05)                                                       # somewhere in episode 4 or later
    finally:
        recorder.send_signal(signal.SIGKILL)                                  # no cleanup runs at all
        recorder.wait()
    demos = ReplayBuffer(1000, {"state": np.zeros(12, np.float32)}, 4)
    demos.load(str(path))
    a = demos.arrays
    assert demos.num_episodes >= 3
    assert a["valid"].sum() == 12 * demos.num_episodes                          # every stored episode is whole
    assert (a["truncated"] | a["terminated"])[a["valid"]].sum() == demos.num_episodes


def test_make_teleop_picks_the_expert_in_the_sim_and_explains_a_missing_device():
    from robot import SO101Env
    from sim import make_sim
    cfg = Config()
    env = SO101Env(cfg, *make_sim(cfg, seed=0))
    assert isinstance(teleop.make_teleop(cfg, env).device, teleop.Expert)
    with pytest.raises(ValueError, match="no gamepad found"):
        teleop.make_teleop(Config(teleop="gamepad"), env)
    with pytest.raises(ValueError, match="needs a display"):
        teleop.make_teleop(Config(teleop="keyboard"), env)
    with pytest.raises(ValueError, match="expected auto"):
        teleop.make_teleop(Config(teleop="spacemouse"), env)


def test_the_real_arm_waits_for_a_fresh_intervene_press_before_an_episode():
    still_held = [(HUMAN, {"intervene"})] * 3 + [(HUMAN, set()), (HUMAN, {"intervene"})]
    t = teleop.Teleop(Scripted(*still_held))
    assert teleop.wait_for_start(t, None) is True and t.device.steps == []
    assert teleop.wait_for_start(teleop.Teleop(Scripted((HUMAN, set()), (HUMAN, {"quit"}))), None) is False


@pytest.mark.parametrize("button", ["success", "failure"])
def test_on_the_real_arm_the_human_ends_the_episode(button):
    from robot import FeetechBus, RealWorld, ServoEmulator, SO101, SO101Env, chain_calibration
    cfg = Config(control_hz=200.0, show_window=False)
    env = SO101Env(cfg, SO101(FeetechBus(ServoEmulator()), chain_calibration()), {}, RealWorld(cfg))
    obs = env.reset()
    still = np.zeros(4, np.float32)
    t = teleop.Teleop(Scripted((still, set()), (still, set()), (still, {button}), (still, set())))
    transitions, outcome = teleop.record_episode(env, t, teleop.OperatorWindow(cfg), obs)
    assert outcome == button
    if button == "success":   # the press makes the next step the terminal, rewarded one
        assert len(transitions) == 3 and transitions[-1][4] and transitions[-1][2] == cfg.reward_success
    else:                     # the episode ends where it is, cut short (truncated), not terminal
        assert len(transitions) == 2 and transitions[-1][5] and not transitions[-1][4]
