"""Tests for robot.py: packets and sign encodings, the bus against the servo emulator (every
instruction, every fault), calibration files, the safety clips, FK/IK, cameras and the env."""

import json
import math
import os
import signal
import time

import numpy as np
import pytest

import robot
from config import Config
from robot import IDS, JOINTS, FeetechBus, ServoEmulator


def make_bus(emulator=None, retries=2):
    emulator = emulator or ServoEmulator()
    return emulator, FeetechBus(emulator, 1_000_000, retries=retries, latency_s=0.0)


def make_arm(max_step_rad=0.1):
    emulator, bus = make_bus()
    arm = robot.SO101(bus, robot.chain_calibration(), max_step_rad)
    arm.connect()
    arm.configure()
    return emulator, arm


def instructions(emulator, code):
    return [p for p in emulator.received if p[4] == code]


# --- packets and sign encodings -------------------------------------------------------------------
def test_instruction_packet_matches_feetech_example():
    # READ 2 bytes at 0x38 from servo 3: the example in Feetech's documentation.
    assert robot.packet(3, robot.READ, [0x38, 2]) == bytes.fromhex("ffff0304023802bc")


@pytest.mark.parametrize("value, sign_bit, encoded", [
    (-100, 11, 0x0864), (-2047, 11, 0x0FFF), (-300, 15, 0x812C), (-1, 15, 0x8001), (-50, 10, 0x0432),
    (1234, 15, 1234), (0, 11, 0)])
def test_sign_magnitude_encoding(value, sign_bit, encoded):
    assert robot.encode_sign(value, sign_bit) == encoded
    assert robot.decode_sign(encoded, sign_bit) == value


def test_homing_offset_beyond_eleven_bits_is_refused():
    with pytest.raises(AssertionError):
        robot.encode_sign(-2048, 11)


@pytest.mark.parametrize("name, value, wire", [
    ("Homing_Offset", -100, "6408"), ("Goal_Position", -300, "2c81"), ("Present_Velocity", -1, "0180"),
    ("Present_Load", -50, "3204"), ("Present_Current", -7, "0780"), ("Model_Number", 777, "0903")])
def test_every_signed_register_round_trips_through_the_emulator(name, value, wire):
    emulator, bus = make_bus()
    bus.write(2, name, value)
    address, size, _ = robot.REGISTERS[name]
    assert emulator.tables[2][address:address + size].hex() == wire  # little-endian, sign bit set
    assert bus.read(2, name) == value
    assert emulator.get(2, name) == value


# --- every instruction, byte for byte -------------------------------------------------------------
def test_ping_reply_is_byte_exact():
    emulator = ServoEmulator()
    emulator.write(robot.packet(1, robot.PING))
    assert emulator.read(100) == bytes.fromhex("ffff010200fc")  # ~(1 + 2 + 0) = 0xfc
    _, bus = make_bus(emulator)
    bus.ping(1)


def test_read_model_number_is_777():
    emulator = ServoEmulator()
    emulator.write(robot.packet(4, robot.READ, [3, 2]))
    assert emulator.read(100) == bytes([0xFF, 0xFF, 4, 4, 0, 0x09, 0x03, ~(4 + 4 + 9 + 3) & 0xFF])
    assert make_bus(emulator)[1].read(4, "Model_Number") == 777


def test_write_gets_an_empty_status_and_changes_the_table():
    emulator = ServoEmulator()
    emulator.write(robot.packet(5, robot.WRITE, [21, 16]))
    assert emulator.read(100) == bytes([0xFF, 0xFF, 5, 2, 0, ~(5 + 2) & 0xFF])
    assert emulator.get(5, "P_Coefficient") == 16


def test_sync_read_replies_come_back_to_back_in_list_order():
    emulator = ServoEmulator()
    for servo_id in IDS:
        emulator.set(servo_id, "Present_Position", 1000 + servo_id)
    emulator.write(robot.packet(0xFE, robot.SYNC_READ, [56, 2, 3, 1, 2]))
    expected = b"".join(robot.packet(i, 0, (1000 + i).to_bytes(2, "little")) for i in (3, 1, 2))
    assert emulator.read(1000) == expected
    assert make_bus(emulator)[1].sync_read("Present_Position", [6, 5, 4]) == [1006, 1005, 1004]


def test_sync_write_sets_every_servo_and_gets_no_reply():
    emulator, bus = make_bus()
    bus.sync_write("Goal_Position", {1: 100, 2: -200, 6: 3000})
    [sent] = instructions(emulator, robot.SYNC_WRITE)
    assert sent[3] == 3 * (1 + 2) + 4  # LEN = N (1 + size) + 4
    assert [emulator.get(i, "Goal_Position") for i in (1, 2, 6)] == [100, -200, 3000]
    assert emulator.in_waiting == 0


def test_timeout_scales_with_the_bytes_expected_at_the_baud_rate():
    emulator = ServoEmulator()
    FeetechBus(emulator, 57_600, latency_s=0.0).read(1, "Present_Position")
    wire_s = (8 + 8) * 10 / 57_600  # READ request and its 2-byte reply, 10 bits a byte
    assert 0.8 * wire_s < emulator.timeout <= wire_s


# --- faults: retries, then an error that names the servo ------------------------------------------
@pytest.mark.parametrize("fault", ["drop", "bad_checksum", "truncate"])
def test_one_bad_reply_is_retried_once(fault):
    emulator, bus = make_bus()
    emulator.set(3, "Present_Position", 1234)
    emulator.inject(3, fault)
    assert bus.read(3, "Present_Position") == 1234
    assert len(emulator.received) == 2


def test_garbage_byte_before_the_header_is_skipped_without_a_retry():
    emulator, bus = make_bus()
    emulator.set(3, "Present_Position", 1234)
    emulator.inject(3, "garbage")
    assert bus.read(3, "Present_Position") == 1234
    assert len(emulator.received) == 1


@pytest.mark.parametrize("fault, problem", [
    ("drop", "did not answer"), ("bad_checksum", "bad checksum"), ("truncate", "truncated reply")])
def test_persistent_fault_raises_after_the_retries_naming_servo_and_joint(fault, problem):
    emulator, bus = make_bus(retries=2)
    emulator.inject(3, fault, times=3)
    with pytest.raises(robot.BusError) as error:
        bus.read(3, "Present_Position")
    assert len(emulator.received) == 3
    message = str(error.value)
    for part in ("servo 3 (elbow_flex)", problem, "READ Present_Position", "after 3 tries", "power", "cable",
                 "id is 3", "1000000 baud"):
        assert part in message


def test_sync_read_retries_when_one_servo_drops_its_reply():
    emulator, bus = make_bus()
    emulator.inject(5, "drop")
    assert bus.sync_read("Present_Position", IDS) == [2048] * 6
    assert len(instructions(emulator, robot.SYNC_READ)) == 2


def test_error_bit_raises_by_name_without_retrying():
    emulator, bus = make_bus()
    emulator.set(6, "Status", 0x20 | 0x01)  # latched overload and input voltage
    with pytest.raises(robot.ServoError, match=r"servo 6 \(gripper\) reports input voltage, overload"):
        bus.read(6, "Present_Position")
    assert len(emulator.received) == 1


def test_servo_that_never_answers_fails_connect_naming_it():
    emulator, bus = make_bus(ServoEmulator(ids=(1, 2, 3, 4, 5)))
    with pytest.raises(robot.BusError, match=r"gripper \(id 6\) does not answer"):
        robot.SO101(bus, None).connect()


def test_wrong_model_fails_connect():
    emulator, bus = make_bus()
    emulator.set(2, "Model_Number", 2825)
    with pytest.raises(robot.BusError, match="shoulder_lift .* model 2825"):
        robot.SO101(bus, None).connect()


# --- configuration, calibration -------------------------------------------------------------------
def test_configure_writes_the_follower_settings():
    emulator, bus = make_bus()
    emulator.set(1, "Phase", 12 | 0x10)
    robot.SO101(bus, robot.chain_calibration()).configure()
    assert emulator.get(1, "Phase") == 12  # multi-turn bit cleared
    assert all(emulator.get(i, "P_Coefficient") == 16 for i in IDS)
    assert [emulator.get(6, r) for r in ("Max_Torque_Limit", "Protection_Current", "Overload_Torque")] == [500, 250, 25]
    assert emulator.get(1, "Max_Torque_Limit") == 1000
    assert emulator.get(3, "Max_Position_Limit") == robot.chain_calibration()["elbow_flex"].range_max


LEROBOT_JSON = {  # a follower calibration file as LeRobot writes it
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1470, "range_min": 758, "range_max": 3292},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": 157, "range_min": 815, "range_max": 3238},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": -1276, "range_min": 856, "range_max": 3094},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": -1299, "range_min": 843, "range_max": 3229},
    "wrist_roll": {"id": 5, "drive_mode": 0, "homing_offset": -1997, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": 1232, "range_min": 2039, "range_max": 3475},
}


def test_lerobot_calibration_loads_and_round_trips(tmp_path):
    path = tmp_path / "lerobot.json"
    path.write_text(json.dumps(LEROBOT_JSON))
    calibration = robot.load_calibration(path)
    assert calibration["shoulder_pan"] == robot.JointCalibration(1, 0, -1470, 758, 3292)
    robot.save_calibration(tmp_path / "ours.json", calibration)
    assert json.loads((tmp_path / "ours.json").read_text()) == LEROBOT_JSON
    assert robot.load_calibration(tmp_path / "ours.json") == calibration


def test_bad_calibration_names_the_joint_and_the_fix(tmp_path):
    data = json.loads(json.dumps(LEROBOT_JSON))
    data["gripper"]["range_min"] = 3600
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="joint 'gripper' .* min 3600, max 3475.* recalibrate with python robot.py"):
        robot.load_calibration(tmp_path / "bad.json")


def test_guided_calibration_records_offsets_and_ranges(tmp_path):
    emulator, bus = make_bus()
    arm = robot.SO101(bus, None)
    centre = [2100, 1900, 2047, 2300, 1000, 2500]  # encoder ticks where the owner centres each joint
    sweeps = {1: (1500, 2600), 2: (1000, 2900), 3: (900, 3100), 4: (1200, 2800), 5: (500, 3500), 6: (2400, 3600)}

    def owner(prompt):
        if "middle" in prompt:
            for servo_id, ticks in zip(IDS, centre):
                emulator.set(servo_id, "Present_Position", ticks)
            return
        for end in (0, 1):
            for servo_id, ticks in sweeps.items():  # present readings already include the new offset
                emulator.set(servo_id, "Present_Position", ticks[end] - (centre[servo_id - 1] - 2047))
            time.sleep(0.1)

    calibration = robot.calibrate(arm, ask=owner)
    assert calibration["shoulder_pan"] == robot.JointCalibration(1, 0, 53, 1500 - 53, 2600 - 53)
    assert (calibration["wrist_roll"].range_min, calibration["wrist_roll"].range_max) == (0, 4095)
    assert emulator.get(1, "Homing_Offset") == 53
    robot.save_calibration(tmp_path / "c.json", calibration)
    assert robot.load_calibration(tmp_path / "c.json") == calibration


def test_ticks_and_radians_convert_both_ways():
    calibration = robot.chain_calibration()
    joints = np.array([0.3, -0.5, 1.0, -1.2, 2.0, 0.25])
    ticks = robot.joints_to_ticks(joints, calibration)
    assert ticks[0] == round(2048 + 0.3 * 4096 / (2 * math.pi))
    assert np.allclose(robot.ticks_to_joints(ticks, calibration), joints, atol=2 * math.pi / 4096)


# --- safety ----------------------------------------------------------------------------------------
def test_goal_beyond_a_joint_limit_is_clipped_on_the_wire():
    emulator, arm = make_arm()
    high = arm.calibration["elbow_flex"].range_max
    emulator.set(3, "Present_Position", high - 10)
    arm.read_ticks()
    joints = arm.read_joints()
    joints[2] = 3.0  # rad, far beyond elbow_flex's 1.69
    arm.write_joints(joints)
    sent = instructions(emulator, robot.SYNC_WRITE)[-1]
    params = sent[5:-1]  # address, size, then id, lo, hi per servo
    assert params[:2] == bytes([42, 2])
    elbow = params[2 + 2 * 3: 2 + 3 * 3]
    assert elbow[0] == 3 and int.from_bytes(elbow[1:], "little") == high


def test_goal_jump_is_limited_per_step():
    emulator, arm = make_arm(max_step_rad=0.1)
    joints = arm.read_joints()
    joints[0] += 1.0
    arm.write_joints(joints)
    assert emulator.get(1, "Goal_Position") == 2048 + int(0.1 * 4096 / (2 * math.pi))


class FakeWorld:
    def __init__(self):
        self.ticks, self.succeeded = 0, False

    def tick(self):
        self.ticks += 1
        return 0.0

    def reset_scene(self, seed):
        self.succeeded = False

    def extra_state(self):
        return np.zeros(0, np.float32)

    def success(self):
        return self.succeeded


def make_env(**overrides):
    cfg = Config(**overrides)
    emulator, arm = make_arm(cfg.max_joint_step_rad)
    return emulator, robot.SO101Env(cfg, arm, {}, FakeWorld())


def test_exception_inside_the_loop_turns_torque_off():
    emulator, env = make_env()
    with pytest.raises(ZeroDivisionError):
        with env:
            env.reset()
            assert all(emulator.get(i, "Torque_Enable") == 1 for i in IDS)
            env.step(np.zeros(4))
            1 / 0
    assert all(emulator.get(i, "Torque_Enable") == 0 for i in IDS)
    last = emulator.received[-1]
    assert last[4] == robot.SYNC_WRITE and last[5] == 40  # the last packet sent was torque off


def test_sigterm_inside_the_loop_turns_torque_off():
    emulator, arm = make_arm()
    arm.torque(True)
    with pytest.raises(SystemExit):
        with arm:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert all(emulator.get(i, "Torque_Enable") == 0 for i in IDS)
    assert signal.getsignal(signal.SIGTERM) is not robot._exit_on_sigterm


# --- kinematics -------------------------------------------------------------------------------------
def test_forward_kinematics_at_zero_matches_the_model():
    pos, rot = robot.forward_kinematics(np.zeros(5))
    assert np.allclose(pos, [0.3914, 0.0, 0.2265], atol=5e-4)
    assert np.allclose(rot @ rot.T, np.eye(3))


def test_home_pose_points_down_in_the_workspace():
    pos, rot = robot.forward_kinematics(robot.HOME_RAD)
    low, high = robot.parse_workspace(Config().workspace_m)
    assert np.all(low <= pos) and np.all(pos <= high)
    assert rot[:, 0] @ [0, 0, -1] > 0.999


def test_ik_of_fk_reaches_random_reachable_targets_within_1mm():
    rng = np.random.default_rng(0)
    errors = []
    while len(errors) < 150:
        q = rng.uniform(robot.ARM_LOW_RAD, robot.ARM_HIGH_RAD)
        target, _ = robot.forward_kinematics(q)
        if not (0.1 < target[0] < 0.35 and abs(target[1]) < 0.2 and 0.0 < target[2] < 0.25):
            continue  # the region in front of the arm, above the table
        q_ik = robot.inverse_kinematics(robot.HOME_RAD, target)
        assert np.all(q_ik >= robot.ARM_LOW_RAD) and np.all(q_ik <= robot.ARM_HIGH_RAD)
        errors.append(np.linalg.norm(robot.forward_kinematics(q_ik)[0] - target))
    assert max(errors) < 1e-3


def test_ik_keeps_the_gripper_pointing_down_inside_the_workspace():
    low, high = robot.parse_workspace(Config().workspace_m)
    for target in np.random.default_rng(1).uniform(low, high, size=(20, 3)):
        q = robot.inverse_kinematics(robot.HOME_RAD, target)
        pos, rot = robot.forward_kinematics(q)
        assert np.linalg.norm(pos - target) < 1e-3
        assert rot[:, 0] @ [0, 0, -1] > math.cos(math.radians(25))


def test_unreachable_target_ends_within_limits_and_stays_put():
    target = np.array([0.8, 0.3, 0.6])  # twice the arm's reach
    q1 = robot.inverse_kinematics(robot.HOME_RAD, target)
    q2 = robot.inverse_kinematics(q1, target)
    assert np.all(np.isfinite(q1)) and np.all(q1 >= robot.ARM_LOW_RAD) and np.all(q1 <= robot.ARM_HIGH_RAD)
    assert np.abs(q2 - q1).max() < 1e-2  # stable: asking again does not move it
    start_distance = np.linalg.norm(robot.forward_kinematics(robot.HOME_RAD)[0] - target)
    assert np.linalg.norm(robot.forward_kinematics(q1)[0] - target) < start_distance - 0.1


# --- the env ----------------------------------------------------------------------------------------
def test_reset_moves_home_in_small_steps_and_returns_the_first_obs():
    emulator, env = make_env()
    obs = env.reset()
    goals = [p for p in instructions(emulator, robot.SYNC_WRITE) if p[5] == 42]
    assert len(goals) > 10  # from the straight arm to home, 0.1 rad per step at most
    assert np.allclose(obs["state"][:5], robot.HOME_RAD, atol=2e-3)
    assert obs["state"][5] == pytest.approx(1.0)  # gripper open
    assert np.allclose(obs["state"][6:9], 0.0)  # EE relative to the episode start
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (9,)


def test_step_moves_the_ee_by_the_scaled_delta_and_clips_to_the_workspace():
    emulator, env = make_env()
    env.reset()
    obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
    assert np.allclose(obs["state"][6:9], [0.01, 0.0, 0.0], atol=1.5e-3)
    for _ in range(30):
        obs, *_ = env.step(np.array([0.0, 0.0, -1.0, 0.0], np.float32))
    ee_z = robot.forward_kinematics(obs["state"][:5])[0][2]
    assert ee_z == pytest.approx(robot.parse_workspace(env.cfg.workspace_m)[0][2], abs=2e-3)


def test_reward_truncation_and_grasp_penalty():
    emulator, env = make_env(episode_steps=3)
    env.reset()
    close = np.array([0, 0, 0, -1], np.float32)
    _, rew, terminated, truncated, info = env.step(close)
    assert (rew, terminated, truncated, info["grasp_penalty"]) == (env.cfg.reward_step, False, False, env.cfg.grasp_penalty)
    _, _, _, truncated, info = env.step(close)  # already closed: no flip, no penalty
    assert info["grasp_penalty"] == 0.0 and not truncated
    env.world.succeeded = True
    _, rew, terminated, truncated, info = env.step(close)
    assert (rew, terminated, truncated, info["success"]) == (env.cfg.reward_success, True, False, True)


def test_real_world_tick_keeps_the_rate_and_reports_overruns():
    world = robot.RealWorld(Config(control_hz=50.0))
    start = time.perf_counter()
    assert world.tick() == 0.0
    assert world.tick() == 0.0
    assert time.perf_counter() - start == pytest.approx(0.04, abs=0.015)
    time.sleep(0.05)
    assert world.tick() == pytest.approx(0.03, abs=0.015)


# --- cameras -----------------------------------------------------------------------------------------
def test_frames_are_cropped_resized_and_rgb():
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[:, 32:] = (255, 0, 0)  # right half blue in OpenCV's BGR
    rgb = robot.process_frame(bgr, (32, 0, 32, 48), 16)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb == (0, 0, 255)).all()


def test_camera_config_parses_indices_paths_and_rois():
    assert robot.parse_cameras("front=0,wrist=/dev/video2", "wrist=10:20:300:200") == {
        "front": (0, None), "wrist": ("/dev/video2", (10, 20, 300, 200))}


def test_camera_that_cannot_open_names_itself():
    with pytest.raises(RuntimeError, match="camera 'front' .*cannot be opened"):
        robot.Camera("front", "/nonexistent/video0", 32)


def test_camera_that_stops_delivering_names_itself(tmp_path):
    import cv2
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        writer.write(np.full((48, 64, 3), (0, 0, 255), np.uint8))  # red in BGR
    writer.release()
    camera = robot.Camera("wrist", path, 16, timeout_s=0.2)  # opening waits for the first frame
    camera._thread.join(timeout=2.0)  # the file ends: no more frames
    with pytest.raises(RuntimeError, match="camera 'wrist' .*stopped delivering frames"):
        camera.read()
    camera.close()


# --- command line ------------------------------------------------------------------------------------
def test_status_only_reads(capsys):
    emulator, bus = make_bus()
    emulator.set(4, "Present_Load", -50)
    robot.print_status(bus)
    out = capsys.readouterr().out
    assert "wrist_flex" in out and "-5.0" in out and "7.4" in out
    assert {p[4] for p in emulator.received} == {robot.READ}


def test_bench_reports_driver_and_wire_time(capsys):
    robot.bench(1_000_000, n=50)
    assert "wire time of the 88 bytes at 1000000 baud 0.880 ms" in capsys.readouterr().out


def test_bus_over_a_real_serial_port():
    """pyserial on a pseudo-terminal, the emulator answering on the other end: real blocking reads."""
    import threading
    import tty

    import serial
    controller, device = os.openpty()
    tty.setraw(controller)
    tty.setraw(device)
    emulator = ServoEmulator()
    emulator.inject(2, "drop")

    def servos():
        while True:
            try:
                emulator.write(os.read(controller, 256))
            except OSError:
                return
            os.write(controller, emulator.read(1000))

    threading.Thread(target=servos, daemon=True).start()
    port = serial.Serial(os.ttyname(device), 1_000_000)
    bus = FeetechBus(port, 1_000_000, retries=2, latency_s=0.05)
    try:
        assert bus.read(1, "Model_Number") == 777
        start = time.perf_counter()
        assert bus.sync_read("Present_Position", IDS) == [2048] * 6  # servo 2 drops once: one retry
        assert 0.05 < time.perf_counter() - start < 0.5  # the retry waited for the timeout first
    finally:
        port.close()
        os.close(controller)


def test_blocked_arm_is_not_pushed_ever_harder():
    emulator, env = make_env()
    env.reset()
    for servo_id in IDS:
        emulator.set(servo_id, "Torque_Enable", 0)  # the servos stop following: as if blocked
    for _ in range(10):
        obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
    ee = robot.forward_kinematics(obs["state"][:5])[0]
    assert env.ee_target[0] - ee[0] == pytest.approx(3 * env.cfg.ee_step_m)  # three steps ahead, no more
