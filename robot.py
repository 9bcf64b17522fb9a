"""The SO-101 follower arm: kinematics, Feetech bus, calibration, cameras, and the env.

`SO101Env.step(act)`: EE delta -> workspace clip -> IK -> calibrated limits -> jump limit -> one SYNC_WRITE,
then the tick, one SYNC_READ, the cameras. Start: `python robot.py --port PORT status`, then `calibrate`."""

import dataclasses
import json
import math
import os
import signal
import threading
import time

import numpy as np

from config import load_config

# FFmpeg, under OpenCV's cameras, prints its own lines when a stream ends ("[http @ 0x...] Stream ends
# prematurely"); Camera.read says it once, naming the camera. -8 is AV_LOG_QUIET; set it to 32 to debug.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
IDS = (1, 2, 3, 4, 5, 6)  # servo id of each joint, in JOINTS order (LeRobot's SO-101 wiring)
STS3215_MODEL = 777
TICKS_PER_RAD = 4096 / (2 * math.pi)  # the STS3215's encoder counts 4096 ticks a turn

# --- Kinematics ---------------------------------------------------------------------------------
# The published SO-101 MJCF ("new calibration"), every joint about its body's local z axis; sim.py builds
# its MuJoCo model from this table too. (body, parent, pos m, quat wxyz, mass kg, joint, joint range rad)
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
# The tool point: the "gripperframe" site at the fixed jaw's tip; x axis along the fingers (down: x = -z).
TOOL_POS = (-0.0079, -0.000218, -0.098127)
TOOL_QUAT = (0.707107, 0.0, 0.707107, 0.0)
ARM_LOW_RAD, ARM_HIGH_RAD = np.array([body[6] for body in SO101_CHAIN[1:6]]).T
# Home (by inverse_kinematics): tool 20 cm out, 8 cm up, pointing down (at 22 cm out, only up to ~9 cm).
HOME_RAD = np.array([0.0, -0.2108, 0.1997, 1.5818, 0.0])


def quat_to_rot(quat):
    """(w, x, y, z) -> 3x3 rotation matrix."""
    w, x, y, z = np.asarray(quat, dtype=float) / np.linalg.norm(quat)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


_LINKS = [(np.array(body[2]), quat_to_rot(body[3])) for body in SO101_CHAIN[1:6]]
_TOOL_ROT = quat_to_rot(TOOL_QUAT)


def _joint_frames(q_rad):
    """Origins and z axes (base frame) of the 5 arm joints, and the tool's position and rotation."""
    pos, rot, origins, axes = np.zeros(3), np.eye(3), [], []
    for (link_pos, link_rot), angle in zip(_LINKS, q_rad):
        pos = pos + rot @ link_pos
        rot = rot @ link_rot
        origins.append(pos)
        axes.append(rot[:, 2])
        c, s = math.cos(angle), math.sin(angle)
        rot = rot @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # the joint turns about local z
    return np.array(origins), np.array(axes), pos + rot @ np.array(TOOL_POS), rot @ _TOOL_ROT


def forward_kinematics(q_rad):
    """5 arm joint angles (rad) -> tool position (3,) m and rotation (3, 3), base frame."""
    return _joint_frames(q_rad)[2:]


def _damped_pinv(jac, damping):
    return jac.T @ np.linalg.inv(jac @ jac.T + damping**2 * np.eye(len(jac)))


def inverse_kinematics(q_rad, target_pos, iters=200, tol_m=1e-4, damping=0.02):
    """Joint angles that put the tool at target_pos, pointing down as far as a 5-DoF arm can: damped least
    squares on position, pointing down in the Jacobian's null space (position wins). wrist_roll is kept,
    joints stay in the model's ranges; an unreachable target ends at the nearest pose, without oscillating."""
    q = np.array(q_rad, dtype=float)
    for _ in range(iters):
        origins, axes, pos, rot = _joint_frames(q)
        err_pos = target_pos - pos
        # Revolute joint i moves the tool by axis_i x (tool - origin_i) and turns it about axis_i.
        jac_pos = np.cross(axes[:4], pos - origins[:4]).T  # (3, 4)
        jac_rot = axes[:4].T  # (3, 4)
        err_rot = np.cross(rot[:, 0], (0.0, 0.0, -1.0))  # turns the approach axis towards straight down
        free = np.ones(4, dtype=bool)  # joints that may move; one pushed past its limit is frozen
        for _ in range(4):
            jp, jr = jac_pos * free, jac_rot * free
            dq = _damped_pinv(jp, damping) @ err_pos
            null = np.diag(free * 1.0) - np.linalg.pinv(jp, rcond=1e-3) @ jp  # moves that keep the position
            dq_down = null @ _damped_pinv(jr @ null, damping) @ (err_rot - jr @ dq)
            # A small secondary step (0.1 rad): larger ones fight the position task and stall it.
            dq += dq_down * min(1.0, 0.1 / (np.abs(dq_down).max() + 1e-12))
            dq *= min(1.0, 0.2 / (np.abs(dq).max() + 1e-12))  # stay where the linearisation holds
            blocked = (q[:4] + dq < ARM_LOW_RAD[:4]) | (q[:4] + dq > ARM_HIGH_RAD[:4])
            if not (blocked & free).any():
                break
            free &= ~blocked
        if np.linalg.norm(err_pos) < tol_m and np.abs(dq).max() < 1e-4:
            break  # on target, and pointing as far down as it can get
        q[:4] = np.clip(q[:4] + dq, ARM_LOW_RAD[:4], ARM_HIGH_RAD[:4])
    return q


def parse_workspace(text):
    """cfg.workspace_m "x0,x1,y0,y1,z0,z1" or cube_area_m "x0,x1,y0,y1" (config.py checks) -> (low, high)."""
    values = [float(v) for v in text.split(",")]
    return np.array(values[0::2]), np.array(values[1::2])


# --- Feetech STS packets ------------------------------------------------------------------------
# FF FF id len instr params.. chk: len = params + 2, chk = ~(id + len + instr + params) & 0xFF; a status reply
# has an error byte for instr. Registers are little-endian, sign-magnitude (sign bit per register).
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
    "Health": (60, 4, None),   # ours: Present_Load, Present_Voltage and Present_Temperature in one read
}
# Bits of a status packet's error byte (and of the Status register), as Feetech names them.
ERROR_BITS = {0x01: "input voltage", 0x02: "angle sensor", 0x04: "overheat", 0x08: "over-current",
              0x20: "overload"}


def checksum(body):
    """Feetech checksum of the bytes between the FF FF header and the checksum byte."""
    return ~sum(body) & 0xFF


def encode_sign(value, sign_bit):
    """Signed int -> sign-magnitude register value (magnitude in the low bits, one sign bit)."""
    if sign_bit is None:
        return value
    assert abs(value) < (1 << sign_bit), f"magnitude {abs(value)} exceeds {(1 << sign_bit) - 1}"
    return (1 << sign_bit) | -value if value < 0 else value


def decode_sign(raw, sign_bit):
    if sign_bit is None:
        return raw
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def register_bytes(name, value):
    _, size, sign_bit = REGISTERS[name]
    return encode_sign(int(value), sign_bit).to_bytes(size, "little")


def register_value(name, data):
    return decode_sign(int.from_bytes(data, "little"), REGISTERS[name][2])


def packet(servo_id, code, params=b""):
    """An instruction packet (code = instruction) or a status packet (code = error byte)."""
    body = bytes([servo_id, len(params) + 2, code]) + bytes(params)
    return b"\xff\xff" + body + bytes([checksum(body)])


def error_names(err):
    return ", ".join(name for bit, name in ERROR_BITS.items() if err & bit) or f"0x{err:02x}"


# --- The emulator: what a chain of STS3215s does with the bytes we send -------------------------
FACTORY_TABLE = {  # power-on values (ST3215 sheet, firmware 3.10)
    "Firmware_Major_Version": 3, "Firmware_Minor_Version": 10, "Model_Number": STS3215_MODEL,
    "Response_Status_Level": 1, "Max_Position_Limit": 4095, "Max_Temperature_Limit": 70,
    "Max_Voltage_Limit": 80,
    "Min_Voltage_Limit": 40, "Max_Torque_Limit": 1000, "Phase": 12, "P_Coefficient": 32, "D_Coefficient": 32,
    "Protection_Current": 500, "Overload_Torque": 80, "Torque_Limit": 1000, "Present_Position": 2048,
    "Goal_Position": 2048, "Present_Voltage": 74, "Present_Temperature": 25,
}
FAULTS = ("drop", "bad_checksum", "truncate", "garbage", "late")   # late: it answers LATE_S after the request
LATE_S = 0.03


class ServoEmulator:
    """Six (by default) STS3215 control tables as a pyserial port, answering as Feetech's reference does
    (silent on a bad checksum, none to broadcasts, SYNC_READ in list order). With torque on, a goal is reached
    at once, within limits (sim.py writes Present_Position from physics). Tests: inject(id, fault, times)
    spoils a servo's next replies; an id not in `ids` is silent; set(id, "Status", bits) latches errors."""

    def __init__(self, ids=IDS):
        self.tables = {servo_id: bytearray(256) for servo_id in ids}
        for servo_id in ids:
            for name, value in {**FACTORY_TABLE, "ID": servo_id}.items():
                self.set(servo_id, name, value)
        self.timeout = None  # pyserial's; the bus sets it and a test reads it back
        self.received = []  # every instruction packet, for tests to inspect the wire
        self._incoming, self._outgoing = bytearray(), bytearray()  # bytes to the servos, bytes from them
        self._late, self._faults = [], {}   # (time it arrives, bytes) of late replies; id -> faults to come

    def get(self, servo_id, name):
        address, size, _ = REGISTERS[name]
        return register_value(name, self.tables[servo_id][address:address + size])

    def set(self, servo_id, name, value):
        address, size, _ = REGISTERS[name]
        self.tables[servo_id][address:address + size] = register_bytes(name, value)

    def inject(self, servo_id, fault, times=1):
        assert fault in FAULTS, f"fault must be one of {FAULTS}"
        self._faults.setdefault(servo_id, []).extend([fault] * times)

    def reset_input_buffer(self):
        self._outgoing.clear()

    def read(self, size=1):
        if not self._outgoing and self._late:   # wait for a late reply, as long as the timeout allows
            time.sleep(max(0.0, min(self._late[0][0] - time.monotonic(), self.timeout or 0.0)))
        while self._late and self._late[0][0] <= time.monotonic():
            self._outgoing += self._late.pop(0)[1]
        data = bytes(self._outgoing[:size])
        del self._outgoing[:size]
        return data

    def write(self, data):
        self._incoming += data
        while (start := self._incoming.find(b"\xff\xff")) >= 0 and len(self._incoming) >= start + 4:
            del self._incoming[:start]
            total = self._incoming[3] + 4
            if len(self._incoming) < total:
                break
            raw = bytes(self._incoming[:total])
            del self._incoming[:total]
            if checksum(raw[2:-1]) == raw[-1]:  # a corrupted instruction gets silence, as on a real bus
                self.received.append(raw)
                self._execute(raw[2], raw[4], raw[5:-1])
        return len(data)

    def _execute(self, servo_id, code, params):
        if code == SYNC_WRITE:
            size = params[1]
            for i in range(2, len(params), size + 1):
                if params[i] in self.tables:
                    self._write_table(params[i], params[0], params[i + 1:i + 1 + size])
        elif code in (READ, SYNC_READ):  # a broadcast READ gets no reply: no servo has its id
            for listed in params[2:] if code == SYNC_READ else [servo_id]:
                if listed in self.tables:
                    self._reply(listed, self.tables[listed][params[0]:params[0] + params[1]])
        elif servo_id in self.tables:  # a unicast PING or WRITE (a broadcast PING would get replies: unused)
            if code == WRITE:
                self._write_table(servo_id, params[0], params[1:])
            if code == PING or (code == WRITE and self.get(servo_id, "Response_Status_Level")):
                self._reply(servo_id, b"")

    def _write_table(self, servo_id, address, data):
        offset_before = self.get(servo_id, "Homing_Offset")
        self.tables[servo_id][address:address + len(data)] = data
        # Present_Position = encoder - Homing_Offset (mod 4096): a new offset shifts the reading.
        shift = self.get(servo_id, "Homing_Offset") - offset_before
        self.set(servo_id, "Present_Position", (self.get(servo_id, "Present_Position") - shift) % 4096)
        if (self.get(servo_id, "Torque_Enable")
                and address <= REGISTERS["Goal_Position"][0] < address + len(data)):
            low, high = self.get(servo_id, "Min_Position_Limit"), self.get(servo_id, "Max_Position_Limit")
            goal = self.get(servo_id, "Goal_Position")
            self.set(servo_id, "Present_Position", goal if low == high == 0 else min(max(goal, low), high))

    def _reply(self, servo_id, data):
        status = packet(servo_id, self.get(servo_id, "Status"), data)
        fault = self._faults[servo_id].pop(0) if self._faults.get(servo_id) else None
        spoiled = {"bad_checksum": status[:-1] + bytes([status[-1] ^ 0xFF]), "truncate": status[:-2],
                   "garbage": b"\xff" + status}  # a stray FF is the hardest case: FF FF FF id ...
        status = spoiled.get(fault, status)
        if fault == "late":
            self._late.append((time.monotonic() + LATE_S, status))
        elif fault != "drop":
            self._outgoing += status


# --- The bus: one transaction = one instruction out, the expected status packets back -----------
class RobotError(RuntimeError):
    """Something of the arm's a user can fix (power, cables, a camera, the calibration): one line."""


class BusError(RobotError):
    """A servo did not answer properly after every retry."""


class ServoError(RobotError):
    """A servo answered with error bits set (they stay latched until its power is cycled)."""


def _joint_of(servo_id):
    return JOINTS[servo_id - 1] if servo_id in IDS else f"id {servo_id}"


class FeetechBus:
    """PING, READ, WRITE, SYNC_READ, SYNC_WRITE over pyserial. A reply is sought in the byte stream as
    Feetech's SDK does, for its wire time + `latency_s`; a missing or bad one is retried `retries` times, then
    BusError names the servo and what to check. Error bits raise ServoError: no retry clears them."""

    def __init__(self, port, baudrate=1_000_000, retries=2, latency_s=0.02):
        self.port, self.baudrate, self.retries, self.latency_s = port, baudrate, retries, latency_s
        self._rx = bytearray()  # received bytes not yet parsed

    def ping(self, servo_id):
        self._transact(packet(servo_id, PING), [servo_id], 0, "PING")

    def read(self, servo_id, name):
        address, size, _ = REGISTERS[name]
        [data] = self._transact(packet(servo_id, READ, [address, size]), [servo_id], size, f"READ {name}")
        return register_value(name, data)

    def write(self, servo_id, name, value):
        request = packet(servo_id, WRITE, bytes([REGISTERS[name][0]]) + register_bytes(name, value))
        self._transact(request, [servo_id], 0, f"WRITE {name}")

    def sync_read(self, name, ids):
        """One request, one status packet per servo back to back; returns the values in ids order."""
        address, size, _ = REGISTERS[name]
        request = packet(BROADCAST_ID, SYNC_READ, bytes([address, size, *ids]))
        return [register_value(name, raw) for raw in self._transact(request, ids, size, f"SYNC_READ {name}")]

    def sync_write(self, name, values):
        """One broadcast packet setting `name` on several servos ({id: value}); servos do not reply."""
        address, size, _ = REGISTERS[name]
        params = bytes([address, size]) + b"".join(bytes([i]) + register_bytes(name, v)
                                                   for i, v in values.items())
        self._port(self.port.write, packet(BROADCAST_ID, SYNC_WRITE, params))

    def _port(self, call, *args):
        """A call on the serial port, whose OSError (pyserial's SerialException: a pulled cable, the arm's
        power gone) becomes one BusError naming the port and what to check."""
        try:
            return call(*args)
        except OSError as error:
            raise BusError(f"the arm's serial port {getattr(self.port, 'port', '')} failed ({error}): "
                           "check its USB cable and the arm's power") from None

    def _transact(self, request, ids, size, what):
        # a byte is 10 bits on the wire: start, 8 data, stop
        timeout_s = (len(request) + len(ids) * (6 + size)) * 10 / self.baudrate + self.latency_s
        for _ in range(1 + self.retries):
            self._port(self.port.reset_input_buffer)  # a late reply to an earlier try must not pass for this
            self._rx.clear()
            self._port(self.port.write, request)
            deadline = time.monotonic() + timeout_s
            try:
                replies = [self._receive(servo_id, size, deadline) for servo_id in ids]
                break
            except _BadReply as bad:
                failure = bad
                # Maybe late (slow USB adapter): drain until latency_s of quiet, lest it answer the next try.
                while self._read(256, time.monotonic() + self.latency_s):
                    pass
        else:
            servo_id, problem = failure.args
            raise BusError(f"servo {servo_id} ({_joint_of(servo_id)}) {problem} to {what} after "
                           f"{1 + self.retries} tries: check the arm's power supply, the cable to this "
                           f"servo, that its id is {servo_id} and that it runs at {self.baudrate} baud")
        for servo_id, (err, _) in zip(ids, replies):
            if err:
                raise ServoError(f"servo {servo_id} ({_joint_of(servo_id)}) reports {error_names(err)} "
                                 f"error on {what}: check the power supply and the load on this joint, "
                                 f"then power-cycle the arm to clear it")
        return [data for _, data in replies]

    def _receive(self, servo_id, size, deadline):
        """Hunt the stream for servo_id's status packet; return (error byte, data bytes)."""
        buf = self._rx
        while True:
            start = buf.find(b"\xff\xff")
            if start < 0:  # no header yet: keep a trailing FF, it may start one
                start = len(buf) - 1 if buf.endswith(b"\xff") else len(buf)
            del buf[:start]
            # Not a header after all (an id, length or error byte no servo sends): skip one byte.
            if ((len(buf) > 2 and buf[2] > 0xFD) or (len(buf) > 3 and not 2 <= buf[3] <= 250)
                    or (len(buf) > 4 and buf[4] > 0x7F)):
                del buf[0]
                continue
            total = buf[3] + 4 if len(buf) > 3 else 6
            if len(buf) >= total:
                raw = bytes(buf[:total])
                del buf[:total]
                if checksum(raw[2:-1]) != raw[-1]:
                    raise _BadReply(servo_id, "sent a reply with a bad checksum")
                if raw[2] != servo_id:
                    continue  # a late reply from another servo: skip it, as Feetech's SDK does
                if total - 6 != size:
                    raise _BadReply(servo_id, f"sent {total - 6} data bytes instead of {size}")
                return raw[4], raw[5:-1]
            chunk = self._read(total - len(buf), deadline)
            if not chunk:
                raise _BadReply(servo_id, "sent a truncated reply" if buf else "did not answer")
            buf += chunk

    def _read(self, size, deadline):
        """Up to `size` bytes, waiting no later than the deadline (b"" once it has passed)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        self.port.timeout = remaining
        return self._port(self.port.read, size)


class _BadReply(Exception):
    """(servo id, what went wrong): one try of a transaction failed; the bus may retry."""


# --- Calibration --------------------------------------------------------------------------------
# Each joint's range in servo ticks, in LeRobot's SO-101 follower JSON format (an arm LeRobot calibrated needs
# no recalibration). The homing offset makes the centred pose read 2048, the model's 0 rad.
@dataclasses.dataclass
class JointCalibration:
    id: int
    drive_mode: int
    homing_offset: int
    range_min: int
    range_max: int


def save_calibration(path, calibration):
    with open(f"{path}.tmp", "w") as f:   # atomically: a stop while writing keeps the old calibration
        json.dump({name: dataclasses.asdict(c) for name, c in calibration.items()}, f, indent=4)
    os.replace(f"{path}.tmp", path)


def load_calibration(path):
    """A calibration JSON (ours or LeRobot's) -> {joint: JointCalibration}, checked joint by joint; a problem
    is one line naming the file and the joint (SystemExit: the arm cannot be driven without it)."""
    def bad(problem):
        return SystemExit(f"error: calibration {path}: {problem} - "
                          "recalibrate with python robot.py --port PORT calibrate")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):   # missing, unreadable or not JSON
        raise bad("no such file or not JSON") from None
    calibration = {}
    for name, servo_id in zip(JOINTS, IDS):
        try:
            c = calibration[name] = JointCalibration(**{k: int(data[name][k])
                                                        for k in JointCalibration.__annotations__})
        except (KeyError, TypeError, ValueError, OverflowError) as error:   # missing, null or not a number
            raise bad(f"joint {name!r}: field {error} missing or not a number") from None
        if c.id != servo_id or not 0 <= c.range_min < c.range_max <= 4095 or abs(c.homing_offset) > 2047:
            raise bad(f"joint {name!r} has id {c.id}, min {c.range_min}, max {c.range_max}, offset "
                      f"{c.homing_offset} (want id {servo_id}, 0 <= min < max <= 4095, |offset| <= 2047)")
    return calibration


def chain_calibration():
    """The calibration whose ranges are the model's joint ranges (homing offset 0): sim.py's arm."""
    return {body[5]: JointCalibration(servo_id, 0, 0, 2048 + math.ceil(body[6][0] * TICKS_PER_RAD),
                                      2048 + math.floor(body[6][1] * TICKS_PER_RAD))
            for servo_id, body in zip(IDS, SO101_CHAIN[1:])}


def ticks_to_joints(ticks, calibration):
    """Servo ticks (6,) -> 5 arm angles in rad (0 at tick 2048) and the gripper opening in [0, 1]."""
    gripper = calibration["gripper"]
    joints = (np.asarray(ticks[:5], dtype=float) - 2048) / TICKS_PER_RAD
    opening = (ticks[5] - gripper.range_min) / (gripper.range_max - gripper.range_min)
    return np.append(joints, np.clip(opening, 0.0, 1.0))


def joints_to_ticks(joints, calibration):
    gripper = calibration["gripper"]
    ticks = np.append(2048 + np.asarray(joints[:5]) * TICKS_PER_RAD,
                      gripper.range_min + joints[5] * (gripper.range_max - gripper.range_min))
    return np.round(ticks).astype(int)


# --- The arm ------------------------------------------------------------------------------------
class SO101:
    """The SO-101 follower on a FeetechBus. As a context manager, torque goes off when the block ends, however
    it ends (an exception, Ctrl-C, or SIGTERM and SIGHUP, made SystemExit so the block unwinds)."""

    def __init__(self, bus, calibration, max_step_rad=0.1):
        self.bus, self.calibration = bus, calibration
        self.max_step_ticks = max_step_rad * TICKS_PER_RAD
        self.last_ticks = None  # the latest positions read; the per-step jump limit starts from them
        self._old_handlers = {}

    def connect(self):
        """Ping every servo and check it is an STS3215 (model 777)."""
        problems = []
        for name, servo_id in zip(JOINTS, IDS):
            try:
                self.bus.ping(servo_id)
                model = self.bus.read(servo_id, "Model_Number")
                if model != STS3215_MODEL:
                    problems.append(f"{name} (id {servo_id}) is model {model}, "
                                    f"not an STS3215 ({STS3215_MODEL})")
            except BusError:
                problems.append(f"{name} (id {servo_id}) does not answer")
        if problems:
            raise BusError(f"SO-101: {'; '.join(problems)} - check power, cables, ids and baud rate")

    def configure(self):
        """LeRobot's SO-101 follower settings (and the calibration), written with torque off."""
        self.torque(False)
        for name, servo_id in zip(JOINTS, IDS):
            # Phase bit 4 = multi-turn readings, which break homing offsets (LeRobot #1296): clear it.
            phase = self.bus.read(servo_id, "Phase")
            settings = [("Lock", 0),  # unlocked: EPROM writes persist across power cycles
                        ("Return_Delay_Time", 0), ("Maximum_Acceleration", 254), ("Acceleration", 254),
                        ("Phase", phase & ~0x10), ("Operating_Mode", 0),  # position control
                        ("P_Coefficient", 16), ("I_Coefficient", 0), ("D_Coefficient", 32)]  # P 16: steadier
            if name == "gripper":
                # SAFETY: a gripper squeezing a cube at full torque trips a latched overload (LeRobot #1809).
                settings += [("Max_Torque_Limit", 500), ("Protection_Current", 250), ("Overload_Torque", 25)]
            if self.calibration:
                c = self.calibration[name]
                # SAFETY: with the limits written, the servo itself refuses goals outside the range.
                settings += [("Homing_Offset", c.homing_offset), ("Min_Position_Limit", c.range_min),
                             ("Max_Position_Limit", c.range_max)]
            for register, value in settings:
                self.bus.write(servo_id, register, value)

    def torque(self, on):
        if on:
            # SAFETY: goal := present position (held in the calibrated range) first, so torque never jumps.
            ticks = self.read_ticks()
            self.bus.sync_write("Goal_Position",
                                dict(zip(IDS, self.within_range(ticks) if self.calibration else ticks)))
        self.bus.sync_write("Torque_Enable", {servo_id: int(on) for servo_id in IDS})

    def read_ticks(self):
        self.last_ticks = np.array(self.bus.sync_read("Present_Position", IDS))
        return self.last_ticks

    def health(self):
        """Every servo's (temperature C, supply V, load as a share of its maximum) from one SYNC_READ."""
        raw = np.array(self.bus.sync_read("Health", IDS))
        load = np.array([decode_sign(int(v) & 0xFFFF, REGISTERS["Present_Load"][2]) for v in raw]) / 1000
        return (raw >> 24).astype(float), (raw >> 16 & 0xFF) / 10, np.abs(load)

    def read_joints(self):
        """5 arm angles (rad) and the gripper opening in [0, 1]."""
        return ticks_to_joints(self.read_ticks(), self.calibration)

    def write_joints(self, joints):
        """Send goals (5 rad + gripper opening) in one SYNC_WRITE, after the safety clips."""
        if not np.isfinite(joints).all():   # SAFETY: NaN would become a goal at one end of a joint's range
            raise RobotError(f"goal {np.round(joints, 3).tolist()} is not finite: "
                             "nothing sent, torque goes off")
        self.bus.sync_write("Goal_Position",
                            dict(zip(IDS, self.safe_goal(joints_to_ticks(joints, self.calibration)))))

    def safe_goal(self, ticks):
        # SAFETY: an arm joint moves at most max_step_rad per step from where it was last read. The
        # gripper is exempt so it can close in one step: its torque is limited in configure().
        last = self.read_ticks() if self.last_ticks is None else self.last_ticks
        ticks[:5] = np.clip(ticks[:5], last[:5] - self.max_step_ticks, last[:5] + self.max_step_ticks)
        # SAFETY: the calibrated range is checked last: an arm outside it comes back, not further out.
        return self.within_range(ticks)

    def within_range(self, ticks):
        c = self.calibration
        return np.clip(ticks, [c[n].range_min for n in JOINTS], [c[n].range_max for n in JOINTS]).astype(int)

    def close(self):
        self.torque(False)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # SIGHUP: a closed terminal, a dropped SSH
            for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
                self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)
        return self

    def __exit__(self, *exc):
        try:
            self.close()  # SAFETY: torque off on every way out of the block
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)


def _exit_on_signal(signum, frame):
    raise SystemExit(f"signal {signum}: turning torque off")


# --- Cameras ------------------------------------------------------------------------------------
def parse_cameras(cameras, camera_roi):
    """cfg.cameras "front=0,wrist=/dev/video2", camera_roi "front=x:y:w:h" -> {name: (source, roi or None)}"""
    rois = dict(item.split("=") for item in camera_roi.split(",") if item)
    result = {}
    for item in cameras.split(","):
        name, source = item.split("=")
        roi = tuple(int(v) for v in rois[name].split(":")) if name in rois else None
        result[name] = (int(source) if source.isdigit() else source, roi)
    return result


def process_frame(bgr, roi, size):
    """OpenCV's BGR frame -> cropped to roi (x, y, w, h), resized to (size, size), RGB uint8."""
    import cv2
    if roi:
        x, y, w, h = roi
        bgr = bgr[y:y + h, x:x + w]
    small = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


class Camera:
    """An OpenCV camera read by a thread that keeps only the newest frame: queued frames go stale."""

    def __init__(self, name, source, size, roi=None, timeout_s=2.0):
        import cv2
        self.name, self.source, self.size, self.roi, self.timeout_s = name, source, size, roi, timeout_s
        self.capture = cv2.VideoCapture(source)
        if not self.capture.isOpened():
            raise RobotError(f"camera {name!r} ({source}) cannot be opened: check it is plugged in, not "
                               f"used by another program, and the index or path in --cameras")
        self._frame, self._stamp, self._running = None, 0.0, True
        self._thread = threading.Thread(target=self._grab, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while self._frame is None:  # fail now, not in the first step, if no frame comes
            if time.monotonic() > deadline:
                raise RobotError(f"camera {name!r} ({source}) opened but sent no frame in {timeout_s} s")
            time.sleep(0.005)
        height, width = self._frame.shape[:2]
        if roi and (roi[0] + roi[2] > width or roi[1] + roi[3] > height):
            raise RobotError(f"--camera_roi {name}={':'.join(map(str, roi))} "
                             f"reaches outside its {width}x{height} frames")

    def _grab(self):
        while self._running:
            ok, frame = self.capture.read()
            if not ok:
                break
            self._frame, self._stamp = frame, time.monotonic()

    def read(self):
        if not self._thread.is_alive() or time.monotonic() - self._stamp > self.timeout_s:
            raise RobotError(f"camera {self.name!r} ({self.source}) stopped delivering frames: "
                               f"check its cable and that no other program uses it")
        return process_frame(self._frame, self.roi, self.size)

    def close(self):
        self._running = False
        self._thread.join(timeout=1.0)
        self.capture.release()


def make_cameras(cfg):
    cameras = {}
    try:
        for name, (source, roi) in parse_cameras(cfg.cameras, cfg.camera_roi).items():
            cameras[name] = Camera(name, source, cfg.image_size, roi)
    except BaseException:   # release those already open: a capture thread left at exit aborts the process
        for camera in cameras.values():
            camera.close()
        raise
    return cameras


# --- The env, and the world it runs in on the real arm (sim.py's SimWorld is the other one) -----
class RealWorld:
    """The real robot's world: a clock at control_hz, and a success flag the human sets."""

    def __init__(self, cfg):
        self.period_s = 1.0 / cfg.control_hz
        self.next_tick = None
        self.succeeded = False  # set by teleop.py (the human's success button) or a reward classifier

    def tick(self):
        """Sleep to the next control tick; return how late this step was (0.0 when on time)."""
        now = time.perf_counter()
        self.next_tick = (self.next_tick or now) + self.period_s
        overrun_s = max(0.0, now - self.next_tick)
        if overrun_s:
            self.next_tick = now  # late: start the next period now rather than rushing to catch up
        else:
            time.sleep(self.next_tick - now)
        return overrun_s

    def reset_scene(self, seed):
        self.succeeded = False  # the human puts the scene back; teleop.py waits for them
        self.next_tick = None

    def extra_state(self):
        return np.zeros(0, dtype=np.float32)

    def success(self):
        return self.succeeded


# The action the env takes, float32 (ACT_DIM,): act[:EE_DIM] is the EE delta x, y, z in [-1, 1]
# (times cfg.ee_step_m), act[EE_DIM] the gripper command -1 close, 0 stay, +1 open (hil-serl).
EE_DIM = 3
ACT_DIM = EE_DIM + 1


class SO101Env:
    """reset() -> obs; step(act) -> (obs, rew, terminated, truncated, info); close(): torque off. obs["state"]
    (float32): 5 arm joints (rad), gripper (0 closed, 1 open), EE - EE at reset (m), world.extra_state()."""

    def __init__(self, cfg, arm, cameras, world):
        self.cfg, self.arm, self.cameras, self.world = cfg, arm, cameras, world
        self.workspace_low, self.workspace_high = parse_workspace(cfg.workspace_m)
        self.torque_on = False
        self.joints = None  # latest measured joints (5 rad + gripper opening)
        self.classifier = None  # obs -> bool, a reward classifier (hilserl.py sets it from --classifier)
        self.health = {}        # this episode's hottest servo, lowest supply and highest load (watchdog)
        self.ee_start = self.ee_target = self.q_target = None  # set by reset(), like gripper_target and steps

    def reset(self, seed=None):
        self.world.reset_scene(seed)
        if not self.torque_on:
            self.arm.torque(True)
            self.torque_on = True
        # Move home smoothly: straight lines in joint space, each step within the jump limit.
        start = self.arm.read_joints()
        home = np.append(HOME_RAD, 1.0)
        n = max(1, math.ceil(np.abs(home[:5] - start[:5]).max() * TICKS_PER_RAD / self.arm.max_step_ticks))
        for i in range(1, n + 1):
            self.arm.write_joints(start + (home - start) * i / n)
            self.world.tick()
            self.joints = self.arm.read_joints()
        self.gripper_target, self.steps, self.q_target = 1.0, 0, self.joints[:5]
        self.health = {"servo/max_temperature_c": 0.0, "servo/min_voltage_v": 99.0, "servo/max_load": 0.0}
        self.overloaded = 0
        self.ee_start = self.ee_target = forward_kinematics(self.joints[:5])[0]
        return self._observe()

    def step(self, act, while_moving=None):
        """while_moving(): what to do between writing the goal and the control tick (the loop learns)."""
        # The EE target integrates the commands rather than restarting from the measured pose:
        # otherwise the servos' steady gravity sag is subtracted again every step and the arm sinks.
        # SAFETY: it leads the measured EE by 3 steps at most, so a blocked arm is not pushed ever harder.
        ee, step_m = forward_kinematics(self.joints[:5])[0], self.cfg.ee_step_m
        lead = np.clip(self.ee_target + np.clip(act[:EE_DIM], -1, 1) * step_m - ee, -3 * step_m, 3 * step_m)
        self.ee_target = np.clip(ee + lead, self.workspace_low, self.workspace_high)
        self.q_target = inverse_kinematics(self.q_target, self.ee_target)  # from the last solution: no jumps
        command = int(round(float(act[EE_DIM])))  # hil-serl's coding: -1 close, 0 stay, +1 open
        gripper = float(command > 0) if command else self.gripper_target
        flipped, self.gripper_target = gripper != self.gripper_target, gripper
        start = time.perf_counter()
        self.arm.write_joints(np.append(self.q_target, self.gripper_target))
        io_s = time.perf_counter() - start   # the bus and cameras, without the wait for the tick
        if while_moving is not None:
            while_moving()
        overrun_s, before = self.world.tick(), self.joints
        start = time.perf_counter()
        obs = self.observe()
        io_s += time.perf_counter() - start
        self.watch(*self.arm.health(), moved=np.abs(self.joints - before)[:5])
        self.steps += 1
        success = bool(self.world.success()) or (self.classifier is not None and self.classifier(obs))
        rew = self.cfg.reward_success if success else self.cfg.reward_step
        truncated = self.steps >= self.cfg.episode_steps and not success
        info = {"success": success, "grasp_penalty": self.cfg.grasp_penalty if flipped else 0.0,
                "overrun_s": overrun_s, "io_s": io_s}
        return obs, rew, success, truncated, info

    def watch(self, temperature, voltage, load, moved):
        """SAFETY: the health watchdog stops the run (torque goes off on exit) when a servo runs hot, its
        supply sags, or an arm joint stays overloaded, unmoving (blocked; the gripper squeezes by design)."""
        stalled = (load[:5] >= 0.8) & (moved < 0.01)   # rad this step
        self.overloaded = self.overloaded + 1 if stalled.any() else 0
        for name, value in zip(self.health, (temperature.max(), voltage.min(), load.max())):
            self.health[name] = (min if "min" in name else max)(self.health[name], float(value))
        hot, sag, worst = temperature.argmax(), voltage.argmin(), (load[:5] * stalled).argmax()
        checks = (
            (temperature[hot] >= self.cfg.max_temperature_c, f"{JOINTS[hot]} is at {temperature[hot]:.0f} C "
             f"(--max_temperature_c {self.cfg.max_temperature_c})", "let it cool and lighten its work"),
            (voltage[sag] < self.cfg.min_voltage_v, f"{JOINTS[sag]}'s supply sagged to {voltage[sag]:.1f} V "
             f"(--min_voltage_v {self.cfg.min_voltage_v})", "charge or check the power supply and its cable"),
            (self.overloaded / self.cfg.control_hz >= self.cfg.overload_s, f"{JOINTS[worst]} has been at "
             f"{load[worst]:.0%} load without moving for {self.cfg.overload_s} s",
             "free the joint: it is blocked"))
        for bad, what, do in checks:
            if bad:
                raise RobotError(f"servo health: {what}: stopping with torque off; {do}")

    def observe(self):
        """Read the joints (and the cameras) now: the step's result, or the scene a human has just reset."""
        self.joints = self.arm.read_joints()
        return self._observe()

    def _observe(self):
        ee = forward_kinematics(self.joints[:5])[0]
        obs = {"state": np.concatenate([self.joints, ee - self.ee_start,
                                        self.world.extra_state()]).astype(np.float32)}
        if self.cfg.use_images:
            obs.update({name: camera.read() for name, camera in self.cameras.items()})
        return obs

    def close(self):
        self.__exit__(None, None, None)  # SAFETY: torque off, cameras released, as a with block does

    def __enter__(self):
        self.arm.__enter__()  # SIGTERM and SIGHUP handling
        return self

    def __exit__(self, *exc):
        try:
            self.arm.__exit__(*exc)  # SAFETY: torque off
        finally:
            for camera in self.cameras.values():
                camera.close()


# --- Command line: status (read-only), calibrate, check -----------------------------------------
def calibrate(arm, ask=input):
    """Guided calibration like LeRobot's: offsets make the centred pose read 2047, then each joint's min
    and max are recorded while the owner sweeps it. wrist_roll has no end stops: it keeps 0..4095 (a
    range breaks at the wrap). Nothing is written before the owner's first answer, and a calibration
    that fails leaves the servos' offsets and limits as they were."""
    kept = ("Homing_Offset", "Min_Position_Limit", "Max_Position_Limit")
    before = {(servo_id, register): arm.bus.read(servo_id, register) for servo_id in IDS for register in kept}
    try:
        ask("Move every joint to the middle of its range, then press ENTER ")
    except EOFError:
        raise RobotError("no answer at the prompt; nothing changed") from None
    try:
        arm.configure()   # torque off, and LeRobot's settings: the readings below need multi-turn off
        for servo_id in IDS:
            for register, value in zip(kept, (0, 0, 4095)):   # wide open: raw readings over the whole turn
                arm.bus.write(servo_id, register, value)
        offsets = arm.read_ticks() - 2047
        for name, servo_id, offset in zip(JOINTS, IDS, offsets):
            if abs(offset) > 2047:
                raise RobotError(f"joint {name!r} reads {offset + 2047}, beyond one turn: power-cycle "
                                 "the arm and retry")
            arm.bus.write(servo_id, "Homing_Offset", int(offset))
        low, high = arm.read_ticks(), arm.read_ticks()

        def sweep_prompt():   # no answer (EOF) ends the sweep: a joint that did not move says so below
            try:
                ask("Move every joint through its whole range, then press ENTER ")
            except EOFError:
                pass
        prompt = threading.Thread(target=sweep_prompt, daemon=True)   # an error must not wait for ENTER
        prompt.start()
        while prompt.is_alive():  # record the extremes while the owner sweeps
            ticks = arm.read_ticks()
            low, high = np.minimum(low, ticks), np.maximum(high, ticks)
            time.sleep(0.02)
        low[4], high[4] = 0, 4095
        calibration = {}
        for name, servo_id, offset, lo, hi in zip(JOINTS, IDS, offsets, low, high):
            if lo >= hi:
                raise RobotError(f"joint {name!r} did not move: run calibrate again and move it end to end")
            calibration[name] = JointCalibration(servo_id, 0, int(offset), int(lo), int(hi))
        return calibration
    except BaseException:   # SAFETY: the servos' limits as they were, not the wide-open ones of the sweep
        for (servo_id, register), value in before.items():
            arm.bus.write(servo_id, register, value)
        raise


def move_to(arm, joints, period_s=0.1, timeout_s=20.0):
    """Resend the goal every period_s (jump-limited) until reached or timed out -> where the joints are."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and np.abs(arm.read_joints() - joints).max() > 0.02:
        arm.write_joints(joints)
        time.sleep(period_s)
    return arm.read_joints()


def check(arm, ask=input, distance_m=0.03, torque_limit=500, step_rad=0.03, short_rad=0.15):
    """Bring-up check at reduced torque (Torque_Limit, 0.1 %) and speed (step_rad per 0.1 s): the tool moves
    distance_m along +x, +y, +z from home and back, the gripper closes and opens. A joint >= short_rad short
    of its goal (weak ones sag a little) or a motion not confirmed -> a problem naming what to check."""
    strength = [arm.bus.read(servo_id, "Torque_Limit") for servo_id in IDS]   # RAM: would outlast the check
    for servo_id in IDS:
        arm.bus.write(servo_id, "Torque_Limit", torque_limit)   # SAFETY: weak and slow while unproven
    arm.max_step_ticks = step_rad * TICKS_PER_RAD
    problems = []
    try:
        arm.torque(True)
        home = move_to(arm, np.append(HOME_RAD, 1.0))
        for axis, way in enumerate(("forward, away from the base", "to its left, seen from behind", "up")):
            target = forward_kinematics(home[:5])[0] + np.eye(3)[axis] * distance_m
            goal = np.append(inverse_kinematics(home[:5], target), home[5])
            short = np.abs(goal - move_to(arm, goal))[:5]
            problems += [f"{JOINTS[j]} stopped {np.degrees(short[j]):.0f} deg short of its goal: its range "
                         "or offset looks wrong, or it is blocked" for j in np.flatnonzero(short > short_rad)]
            if not (ask(f"did the gripper move {distance_m * 100:.0f} cm {way}? [y/n] ")
                    .strip().lower().startswith("y")):
                turned = [JOINTS[j] for j in np.argsort(-np.abs(goal - home)[:5])[:2]]
                problems.append(f"+{'xyz'[axis]} went the wrong way: check the offset (the centred pose) and "
                                f"the direction of {turned[0]} and {turned[1]}, the joints it turned most")
            move_to(arm, home)
        for opening, word in ((0.0, "close"), (1.0, "open")):
            move_to(arm, np.append(home[:5], opening))
            if not ask(f"did the gripper {word}? [y/n] ").strip().lower().startswith("y"):
                problems.append(f"gripper: did not {word}; check its range "
                                "(range_min is closed, range_max open)")
    finally:
        arm.torque(False)
        for servo_id, value in zip(IDS, strength):
            arm.bus.write(servo_id, "Torque_Limit", value)
    return problems


def print_status(bus):
    print(f"{'joint':14} {'id':>3} {'ticks':>6} {'temp C':>7} {'volt V':>7} {'load %':>7} {'torque':>6}  "
          "errors")
    registers = ("Present_Position", "Present_Temperature", "Present_Voltage", "Present_Load",
                 "Torque_Enable", "Status")
    for name, servo_id in zip(JOINTS, IDS):
        try:
            ticks, temperature, voltage, load, torque, status = [bus.read(servo_id, r) for r in registers]
        except (BusError, ServoError) as error:
            print(f"{name:14} {servo_id:>3}  {error}")
            continue
        print(f"{name:14} {servo_id:>3} {ticks:>6} {temperature:>7} {voltage / 10:>7.1f} {load / 10:>7.1f} "
              f"{'on' if torque else 'off':>6}  {error_names(status) if status else '-'}")


def open_bus(port, cfg):
    """A FeetechBus on a serial port; a port that does not open is a one-line error."""
    import serial
    try:
        link = serial.Serial(port, cfg.baudrate)
    except serial.SerialException as error:
        raise SystemExit(f"error: cannot open {port} ({error.strerror or error}); check the USB cable and "
                         "the port's name (ls /dev/ttyACM* /dev/ttyUSB*) and, on Linux, that you are in the "
                         "dialout group")
    return FeetechBus(link, cfg.baudrate, cfg.read_retries, cfg.bus_latency_s)


def main():
    cfg, words = load_config()
    command = words[0] if words else "status"
    if command not in ("status", "torque-off", "calibrate", "check") or not cfg.port:
        raise SystemExit("usage: python robot.py --port /dev/ttyACM0 status|torque-off|calibrate|check")
    bus = open_bus(cfg.port, cfg)
    if command == "status":
        return print_status(bus)
    if command == "torque-off":   # SAFETY: after kill -9 torque stays on (the STS3215 has no watchdog)
        bus.sync_write("Torque_Enable", {servo_id: 0 for servo_id in IDS})
        return print_status(bus)
    if command == "check":
        try:
            with SO101(bus, load_calibration(cfg.calibration)) as arm:
                arm.connect()
                arm.configure()
                input("the arm moves to its home pose at half torque, then 3 cm each way: "
                      "clear the area, press ENTER ")
                problems = check(arm)
        except (RobotError, EOFError) as error:
            raise SystemExit(f"error: check stopped: {error or 'no answer at the prompt'}") from None
        print("\n".join(problems) or f"{cfg.calibration}: every joint went where it was sent; ready to learn")
        raise SystemExit(1 if problems else 0)
    try:
        with SO101(bus, None, cfg.max_joint_step_rad) as arm:
            arm.connect()
            arm.calibration = calibrate(arm)   # it configures the servos once the owner answers
            arm.configure()  # writes the new offsets and limits to the servos
        save_calibration(cfg.calibration, arm.calibration)
    except (RobotError, EOFError, OSError) as error:   # EOFError: the terminal closed at a prompt
        raise SystemExit(f"error: calibration not saved: {error or 'no answer at the prompt'}") from None
    print(f"saved {cfg.calibration}; torque is off")


if __name__ == "__main__":
    main()
