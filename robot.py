"""The SO-101 follower arm: Feetech bus, calibration, kinematics, cameras, and the env.

This file is the bottom of the control loop. `SO101Env.step(act)` turns an end-effector delta into
joint goals (workspace clip -> IK -> calibrated limits -> per-step jump limit), writes them in one
SYNC_WRITE, waits for the control tick, reads the joints back in one SYNC_READ, grabs the camera
frames and returns the next observation. Everything below it is plain Python on a serial port:

  kinematics     the arm's chain (from the published SO-101 model), FK and damped least-squares IK
  packets        the Feetech STS protocol: checksum, sign-magnitude registers, instruction/status packets
  ServoEmulator  six STS3215 servos answering packets byte-exactly, for tests and for sim.py
  FeetechBus     PING/READ/WRITE/SYNC_READ/SYNC_WRITE with timeouts and bounded retries
  SO101          connect, configure, calibration, ticks <-> radians, safe goals, torque off on exit
  Camera         OpenCV capture in a thread (newest frame, no buffered latency), crop, resize, RGB
  SO101Env       reset/step as hilserl.py and teleop.py use it, on the real arm or on sim.py
Run `python robot.py --port /dev/ttyACM0 status` first, then `calibrate`; `bench` times the bus.
"""

import dataclasses
import json
import math
import signal
import sys
import threading
import time

import numpy as np

from config import load_config

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
IDS = (1, 2, 3, 4, 5, 6)  # servo id of each joint, in JOINTS order (LeRobot's SO-101 wiring)
STS3215_MODEL = 777
TICKS_PER_REV = 4096

# ------------------------------------------------------------------------------------------------
# Kinematics. The numbers are the published SO-101 MJCF ("new calibration" convention): each body
# relative to its parent, quaternions w,x,y,z, every joint about its body's local z axis. sim.py
# builds its MuJoCo model from this same table, so the real arm and the sim share one model.
# (body, parent, pos m, quat wxyz, mass kg, joint, joint range rad)
SO101_CHAIN = (
    ("base", "world", (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), 0.147, None, None),
    ("shoulder", "base", (0.03884, 0.0, 0.0624), (0.0, 0.0, -1.0, 0.0), 0.100,
     "shoulder_pan", (-1.91986, 1.91986)),
    ("upper_arm", "shoulder", (-0.0304, -0.01828, -0.0542), (0.5, -0.5, -0.5, -0.5), 0.103,
     "shoulder_lift", (-1.74533, 1.74533)),
    ("lower_arm", "upper_arm", (-0.11257, -0.028, 0.0), (0.707107, 0.0, 0.0, 0.707107), 0.104,
     "elbow_flex", (-1.69, 1.69)),
    ("wrist", "lower_arm", (-0.1349, 0.0052, 0.0), (0.707107, 0.0, 0.0, -0.707107), 0.079,
     "wrist_flex", (-1.65806, 1.65806)),
    ("gripper", "wrist", (0.0, -0.0611, 0.0181), (0.017209, -0.017209, 0.706897, 0.706897), 0.087,
     "wrist_roll", (-2.74385, 2.84121)),
    ("moving_jaw", "gripper", (0.0202, 0.0188, -0.0234), (0.707107, 0.707107, 0.0, 0.0), 0.012,
     "gripper", (-0.17453, 1.74533)),
)
# The tool point: the "gripperframe" site on the gripper body, at the fixed jaw's tip. Its x axis
# is the approach direction (along the fingers); "pointing down" means x axis = -z of the base.
TOOL_POS = (-0.0079, -0.000218, -0.098127)
TOOL_QUAT = (0.707107, 0.0, 0.707107, 0.0)
ARM_LOW_RAD = np.array([body[6][0] for body in SO101_CHAIN[1:6]])
ARM_HIGH_RAD = np.array([body[6][1] for body in SO101_CHAIN[1:6]])
# Home: tool 20 cm in front of the base, 8 cm up, pointing down, gripper open (found with
# inverse_kinematics below; the arm can hold the gripper vertical only up to ~9 cm at 22 cm out).
HOME_RAD = np.array([0.0, -0.2108, 0.1997, 1.5818, 0.0])


def quat_to_rot(quat):
    """(w, x, y, z) -> 3x3 rotation matrix."""
    w, x, y, z = np.asarray(quat, dtype=float) / np.linalg.norm(quat)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _rot_z(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


_LINKS = [(np.array(body[2]), quat_to_rot(body[3])) for body in SO101_CHAIN[1:6]]
_TOOL_ROT = quat_to_rot(TOOL_QUAT)


def _joint_frames(q_rad):
    """Origins and z axes (base frame) of the 5 arm joints, and the tool's position and rotation."""
    pos, rot = np.zeros(3), np.eye(3)
    origins, axes = [], []
    for (link_pos, link_rot), angle in zip(_LINKS, q_rad):
        pos = pos + rot @ link_pos
        rot = rot @ link_rot
        origins.append(pos)
        axes.append(rot[:, 2])
        rot = rot @ _rot_z(angle)
    return np.array(origins), np.array(axes), pos + rot @ np.array(TOOL_POS), rot @ _TOOL_ROT


def forward_kinematics(q_rad):
    """5 arm joint angles (rad) -> tool position (3,) m and rotation (3, 3), base frame."""
    _, _, pos, rot = _joint_frames(q_rad)
    return pos, rot


def _damped_pinv(jac, damping):
    return jac.T @ np.linalg.inv(jac @ jac.T + damping**2 * np.eye(len(jac)))


def inverse_kinematics(q_rad, target_pos, iters=200, tol_m=1e-4, damping=0.02):
    """Joint angles that put the tool at target_pos with the gripper pointing down as far as possible.

    Damped least squares on position first; pointing down is a second task solved in the position
    Jacobian's null space, so position wins when both cannot hold (the 5-DoF arm cannot point
    down everywhere). Only pan, lift, elbow and wrist_flex move: wrist_roll only turns the tool
    about the vertical and keeps its value. Joints stay within the model's ranges; an unreachable
    target ends at the nearest pose the iterations find, without oscillating.
    """
    q = np.array(q_rad, dtype=float)
    down = np.array([0.0, 0.0, -1.0])
    for _ in range(iters):
        origins, axes, pos, rot = _joint_frames(q)
        err_pos = target_pos - pos
        # Revolute joint i moves the tool by axis_i x (tool - origin_i) and turns it about axis_i.
        jac_pos = np.cross(axes[:4], pos - origins[:4]).T  # (3, 4)
        jac_rot = axes[:4].T  # (3, 4)
        err_rot = np.cross(rot[:, 0], down)  # turns the approach axis towards straight down
        free = np.ones(4, dtype=bool)  # joints that may move; one pushed past its limit is frozen
        for _ in range(4):
            jp, jr = jac_pos * free, jac_rot * free
            dq = _damped_pinv(jp, damping) @ err_pos
            null = np.diag(free * 1.0) - np.linalg.pinv(jp, rcond=1e-3) @ jp  # moves that keep the position
            dq_down = null @ _damped_pinv(jr @ null, damping) @ (err_rot - jr @ dq)
            # A small secondary step (0.1 rad): larger ones fight the position task and stall it.
            dq += dq_down * min(1.0, 0.1 / (np.abs(dq_down).max() + 1e-12))
            blocked = (q[:4] + dq < ARM_LOW_RAD[:4]) | (q[:4] + dq > ARM_HIGH_RAD[:4])
            if not (blocked & free).any():
                break
            free &= ~blocked
        dq *= min(1.0, 0.2 / (np.abs(dq).max() + 1e-12))  # stay where the linearisation holds
        if np.linalg.norm(err_pos) < tol_m and np.abs(dq).max() < 1e-4:
            break  # on target, and pointing as far down as it can get
        q[:4] = np.clip(q[:4] + dq, ARM_LOW_RAD[:4], ARM_HIGH_RAD[:4])
    return q


def parse_workspace(text):
    """cfg.workspace_m "x0,x1,y0,y1,z0,z1" -> (low (3,), high (3,)) in metres."""
    values = [float(v) for v in text.split(",")]
    assert len(values) == 6, f"workspace_m needs 6 numbers x0,x1,y0,y1,z0,z1, got {text!r}"
    return np.array(values[0::2]), np.array(values[1::2])


# ------------------------------------------------------------------------------------------------
# Feetech STS packets. Instruction: FF FF id len instr params.. chk, with len = params + 2 and
# chk = ~(id + len + instr + params) & 0xFF. A status reply has the same shape with an error byte
# in the instruction's place. Multi-byte registers are little-endian; negative values are
# sign-magnitude, with the sign bit depending on the register.
PING, READ, WRITE, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x82, 0x83
BROADCAST_ID = 0xFE
# The STS3215 control table (LeRobot's names): name -> (address, bytes, sign bit or None).
REGISTERS = {
    "Firmware_Major_Version": (0, 1, None), "Firmware_Minor_Version": (1, 1, None),
    "Model_Number": (3, 2, None), "ID": (5, 1, None), "Baud_Rate": (6, 1, None),
    "Return_Delay_Time": (7, 1, None), "Response_Status_Level": (8, 1, None),
    "Min_Position_Limit": (9, 2, None), "Max_Position_Limit": (11, 2, None),
    "Max_Temperature_Limit": (13, 1, None), "Max_Voltage_Limit": (14, 1, None),
    "Min_Voltage_Limit": (15, 1, None), "Max_Torque_Limit": (16, 2, None), "Phase": (18, 1, None),
    "P_Coefficient": (21, 1, None), "D_Coefficient": (22, 1, None), "I_Coefficient": (23, 1, None),
    "Protection_Current": (28, 2, None), "Homing_Offset": (31, 2, 11), "Operating_Mode": (33, 1, None),
    "Overload_Torque": (36, 1, None), "Torque_Enable": (40, 1, None), "Acceleration": (41, 1, None),
    "Goal_Position": (42, 2, 15), "Goal_Velocity": (46, 2, 15), "Torque_Limit": (48, 2, None),
    "Lock": (55, 1, None), "Present_Position": (56, 2, 15), "Present_Velocity": (58, 2, 15),
    "Present_Load": (60, 2, 10), "Present_Voltage": (62, 1, None), "Present_Temperature": (63, 1, None),
    "Status": (65, 1, None), "Moving": (66, 1, None), "Present_Current": (69, 2, 15),
    "Maximum_Acceleration": (85, 1, None),
}
# Bits of a status packet's error byte (and of the Status register), as Feetech names them.
ERROR_BITS = {0x01: "input voltage", 0x02: "angle sensor", 0x04: "overheat",
              0x08: "over-current", 0x20: "overload"}


def checksum(body):
    """Feetech checksum of the bytes between the FF FF header and the checksum byte."""
    return ~sum(body) & 0xFF


def encode_sign(value, sign_bit):
    """Signed int -> sign-magnitude register value (magnitude in the low bits, one sign bit)."""
    if sign_bit is None or value >= 0:
        assert sign_bit is None or value < (1 << sign_bit), f"{value} needs more than {sign_bit} bits"
        return value
    assert -value < (1 << sign_bit), f"magnitude {-value} exceeds {(1 << sign_bit) - 1}"
    return (1 << sign_bit) | -value


def decode_sign(raw, sign_bit):
    if sign_bit is None:
        return raw
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def register_bytes(name, value):
    """A register's value as the little-endian bytes that go on the wire."""
    _, size, sign_bit = REGISTERS[name]
    return encode_sign(int(value), sign_bit).to_bytes(size, "little")


def register_value(name, data):
    _, _, sign_bit = REGISTERS[name]
    return decode_sign(int.from_bytes(data, "little"), sign_bit)


def packet(servo_id, code, params=b""):
    """An instruction packet (code = instruction) or a status packet (code = error byte)."""
    body = bytes([servo_id, len(params) + 2, code]) + bytes(params)
    return b"\xff\xff" + body + bytes([checksum(body)])


def error_names(err):
    return ", ".join(name for bit, name in ERROR_BITS.items() if err & bit) or f"0x{err:02x}"


# ------------------------------------------------------------------------------------------------
# The emulator: what a chain of STS3215s does with the bytes we send. It follows Feetech's
# reference behaviour (silent on a bad checksum, no reply to broadcasts, SYNC_READ answered by one
# status packet per listed servo in list order, back to back). It lives here rather than in the
# tests because sim.py drives it too: the sim reads Goal_Position and writes Present_Position
# through get()/set(), so the whole driver runs unchanged on the simulated arm.
FACTORY_TABLE = {  # power-on values (ST3215 sheet, firmware 3.10)
    "Firmware_Major_Version": 3, "Firmware_Minor_Version": 10, "Model_Number": STS3215_MODEL,
    "Response_Status_Level": 1, "Max_Position_Limit": 4095, "Max_Temperature_Limit": 70,
    "Max_Voltage_Limit": 80, "Min_Voltage_Limit": 40, "Max_Torque_Limit": 1000, "Phase": 12,
    "P_Coefficient": 32, "D_Coefficient": 32, "Protection_Current": 500, "Overload_Torque": 80,
    "Torque_Limit": 1000, "Present_Position": 2048, "Goal_Position": 2048,
    "Present_Voltage": 74, "Present_Temperature": 25,
}
FAULTS = ("drop", "bad_checksum", "truncate", "garbage")


class ServoEmulator:
    """Six (by default) STS3215 control tables behind a pyserial-like read/write interface.

    An ideal servo: with torque on, a goal is reached at once (clamped to the position limits).
    sim.py replaces that with physics by writing Present_Position after each physics step.
    Faults for tests: inject(id, fault, times) makes that servo's next replies misbehave; a
    servo left out of `ids` never answers; set(id, "Status", bits) latches error bits.
    """

    def __init__(self, ids=IDS):
        self.tables = {}
        for servo_id in ids:
            self.tables[servo_id] = bytearray(256)
            for name, value in FACTORY_TABLE.items():
                self.set(servo_id, name, value)
            self.set(servo_id, "ID", servo_id)
        self.timeout = None
        self.received = []  # every instruction packet, for tests to inspect the wire
        self._incoming = bytearray()
        self._outgoing = bytearray()
        self._faults = {}

    # --- register access for sim.py and tests
    def get(self, servo_id, name):
        address, size, _ = REGISTERS[name]
        return register_value(name, self.tables[servo_id][address:address + size])

    def set(self, servo_id, name, value):
        address, size, _ = REGISTERS[name]
        self.tables[servo_id][address:address + size] = register_bytes(name, value)

    def inject(self, servo_id, fault, times=1):
        assert fault in FAULTS, f"fault must be one of {FAULTS}"
        self._faults.setdefault(servo_id, []).extend([fault] * times)

    # --- the pyserial side
    @property
    def in_waiting(self):
        return len(self._outgoing)

    def reset_input_buffer(self):
        self._outgoing.clear()

    def read(self, size=1):
        data = bytes(self._outgoing[:size])
        del self._outgoing[:size]
        return data

    def write(self, data):
        self._incoming += data
        while True:
            start = self._incoming.find(b"\xff\xff")
            if start < 0 or len(self._incoming) < start + 4:
                return len(data)
            del self._incoming[:start]
            total = self._incoming[3] + 4
            if len(self._incoming) < total:
                return len(data)
            raw = bytes(self._incoming[:total])
            del self._incoming[:total]
            if checksum(raw[2:-1]) == raw[-1]:  # a corrupted instruction gets silence, as on a real bus
                self.received.append(raw)
                self._execute(raw[2], raw[4], raw[5:-1])

    def _execute(self, servo_id, code, params):
        if code == SYNC_WRITE:
            size = params[1]
            for i in range(2, len(params), size + 1):
                if params[i] in self.tables:
                    self._write_table(params[i], params[0], params[i + 1:i + 1 + size])
        elif code == SYNC_READ:
            for listed in params[2:]:
                if listed in self.tables:
                    self._reply(listed, self.tables[listed][params[0]:params[0] + params[1]])
        elif servo_id in self.tables:  # unicast; broadcast gets no reply (PING excepted, unused here)
            table = self.tables[servo_id]
            if code == PING:
                self._reply(servo_id, b"")
            elif code == READ:
                self._reply(servo_id, table[params[0]:params[0] + params[1]])
            elif code == WRITE:
                self._write_table(servo_id, params[0], params[1:])
                if table[REGISTERS["Response_Status_Level"][0]]:
                    self._reply(servo_id, b"")

    def _write_table(self, servo_id, address, data):
        table = self.tables[servo_id]
        offset_before = self.get(servo_id, "Homing_Offset")
        table[address:address + len(data)] = data
        # Present_Position = encoder - Homing_Offset (mod 4096): a new offset shifts the reading.
        shift = self.get(servo_id, "Homing_Offset") - offset_before
        self.set(servo_id, "Present_Position", (self.get(servo_id, "Present_Position") - shift) % 4096)
        if self.get(servo_id, "Torque_Enable") and address <= REGISTERS["Goal_Position"][0] < address + len(data):
            low, high = self.get(servo_id, "Min_Position_Limit"), self.get(servo_id, "Max_Position_Limit")
            goal = self.get(servo_id, "Goal_Position")
            self.set(servo_id, "Present_Position", goal if low == high == 0 else min(max(goal, low), high))

    def _reply(self, servo_id, data):
        status = packet(servo_id, self.get(servo_id, "Status"), data)
        pending = self._faults.get(servo_id)
        fault = pending.pop(0) if pending else None
        if fault == "drop":
            return
        if fault == "bad_checksum":
            status = status[:-1] + bytes([status[-1] ^ 0xFF])
        elif fault == "truncate":
            status = status[:-2]
        elif fault == "garbage":
            status = b"\xff" + status  # a stray FF is the hardest case: FF FF FF id ...
        self._outgoing += status
