"""The simulated SO-101: a MuJoCo arm, table and cube behind the real robot's interfaces.

With no --port, hilserl.py and teleop.py run on this twin of the robot: robot.py's FeetechBus, SO101 and
SO101Env run unchanged, as its ServoEmulator answers the packets a real servo would. One control step:

  SO101Env.step: SYNC_WRITE goals -> emulator registers
  SimWorld.tick: registers -> MuJoCo ctrl -> 50 physics steps of 2 ms -> present registers
  SO101Env.step: SYNC_READ positions, SimCamera.read() renders a frame, SimWorld.success()

Simulated time never waits for the wall clock, so training runs as fast as the machine allows. A
ScriptedExpert stands in for the human: it records demos and takes over when the policy goes astray.
"""

import ctypes.util
import json
import os
import select
import threading
import time
import tty
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# MuJoCo picks its OpenGL backend at import: EGL renders without a display; OSMesa is the fallback.
os.environ.setdefault("MUJOCO_GL", "egl" if ctypes.util.find_library("EGL") else "osmesa")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from config import load_config  # noqa: E402
from robot import (FAULTS, HOME_RAD, IDS, JOINTS, SO101, SO101_CHAIN, TICKS_PER_RAD, TOOL_POS,  # noqa: E402
                   TOOL_QUAT, FeetechBus, ServoEmulator, chain_calibration, forward_kinematics,
                   parse_workspace, quat_to_rot)

# ------------------------------------------------------------------------------------------------
# The scene, as MJCF text from robot.py's kinematic table, so the sim and the real arm's FK/IK share one set
# of numbers. Primitives: capsules from each joint to the next, two jaws with collision pads. Simplifications:
# only the pads, the cube and the table collide (the arm can pass through the table; the workspace box keeps
# it up), and each link's inertia is a small sphere's (its mass is the published one).
SERVO_KP = 17.8        # STS3215 position gain, N m/rad, as the published SO-101 MJCF tunes it
STALL_TORQUE_NM = 3.35  # STS3215 at 7.4 V: the actuators' force range at Torque_Limit 1000
PAD_HALF_M = (0.004, 0.010, 0.014)  # fixed-jaw pad box: half thickness, width, length
TIP_RADIUS_M = 0.005                # moving-jaw tip: a capsule across the jaw, touches the pad at 0 rad
TIP_UP_M = 0.004                    # the moving tip sits this far above the tool point when closed
CUBE_MASS_KG = 0.05
WRIST_CAMERA_M = (0.0, -0.05, -0.03)  # on the side of the gripper, looking between the jaw tips


def _v(vec):
    return " ".join(f"{x:.6g}" for x in vec)


def _look_at(pos, target, up=(0.0, 0.0, 1.0)):
    """MJCF xyaxes for a camera at pos looking at target (MuJoCo cameras look along their -z)."""
    back = np.asarray(pos, float) - target
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    return _v(np.concatenate([right, np.cross(back, right)]))


def _link_geoms(i):
    """Primitive geoms of body i of SO101_CHAIN, in that body's frame."""
    name, _, pos, quat, _, _, _ = SO101_CHAIN[i]
    tool = np.asarray(TOOL_POS)
    if name == "base":
        top = np.asarray(SO101_CHAIN[1][2])
        return [f'<geom class="link" type="cylinder" size="0.045 {top[2] / 2:.4g}" '
                f'pos="{top[0]:.4g} 0 {top[2] / 2:.4g}"/>']
    if name == "gripper":  # fixed jaw: a finger to the tool point, a pad with its inner face there
        return ['<geom class="link" type="box" size="0.022 0.028 0.02" pos="0 0 -0.02"/>',
                f'<geom class="link" type="capsule" size="0.007" '
                f'fromto="0 0 -0.02 {_v(tool + [-0.008, 0, 0.008])}"/>',
                f'<geom name="fixed_pad" class="pad" type="box" size="{_v(PAD_HALF_M)}" '
                f'pos="{_v(tool + [-PAD_HALF_M[0], 0, PAD_HALF_M[2] - 0.002])}"/>',
                f'<site name="tool" pos="{_v(tool)}" quat="{_v(TOOL_QUAT)}"/>',
                f'<camera name="wrist" pos="{_v(WRIST_CAMERA_M)}" fovy="70" '
                f'xyaxes="{_look_at(WRIST_CAMERA_M, tool + [0.02, 0, 0.01], up=(0, 0, 1))}"/>']
    if name == "moving_jaw":  # its tip closes onto the fixed pad; the jaw opens with positive angles
        tip = quat_to_rot(quat).T @ (tool + [TIP_RADIUS_M, 0, TIP_UP_M] - np.asarray(pos))
        across = np.array([0.0, 0.0, PAD_HALF_M[1]])
        return [f'<geom class="link" type="capsule" size="0.006" fromto="0 0 {tip[2]:.4g} {_v(tip)}"/>',
                f'<geom name="moving_pad" class="pad" type="capsule" size="{TIP_RADIUS_M}" '
                f'fromto="{_v(tip - across)} {_v(tip + across)}"/>']
    return [f'<geom class="link" type="capsule" size="0.02" fromto="0 0 0 {_v(SO101_CHAIN[i + 1][2])}"/>']


def scene_xml(cfg):
    """The whole scene as MJCF text: table, SO-101 from robot.py's chain, cube, two cameras."""
    arm = ""
    for i in reversed(range(len(SO101_CHAIN))):  # nest from the jaw outwards: each body holds its child
        name, _, pos, quat, mass, joint, joint_range = SO101_CHAIN[i]
        hinge = f'<joint name="{joint}" range="{joint_range[0]} {joint_range[1]}"/>' if joint else ""
        arm = (f'<body name="{name}" pos="{_v(pos)}" quat="{_v(quat)}">{hinge}'
               f'<inertial pos="0 0 0" mass="{mass}" diaginertia="5e-5 5e-5 5e-5"/>'
               + "".join(_link_geoms(i)) + arm + "</body>")
    servos = "".join(f'<position name="{joint}" joint="{joint}" kp="{SERVO_KP}" ctrlrange="{r[0]} {r[1]}" '
                     f'forcerange="{-STALL_TORQUE_NM} {STALL_TORQUE_NM}"/>'
                     for (*_, joint, r) in SO101_CHAIN if joint)
    half = cfg.cube_size_m / 2
    return f"""<mujoco model="so101_cube">
  <compiler angle="radian"/>
  <!-- Grasping is reliable only with noslip, an elliptic cone and implicitfast (measured). -->
  <option timestep="{cfg.sim_timestep_s}" integrator="implicitfast" cone="elliptic" impratio="10"
          noslip_iterations="5"/>
  <!-- No shadows, no multisampling: default rendering is several times slower on a software renderer. -->
  <visual><global offwidth="{cfg.image_size}" offheight="{cfg.image_size}"/>
          <quality shadowsize="0" offsamples="0"/></visual>
  <default>
    <joint damping="0.6" frictionloss="0.052" armature="0.028"/>
    <!-- Stiff contacts (time constant 2 timesteps): with MuJoCo's default 20 ms the 3 N m gripper
         squeezes the light cube 9 mm deep into the pads. -->
    <geom friction="1.5 0.005 0.0001" solref="{2 * cfg.sim_timestep_s} 1" solimp="0.95 0.99 0.001"/>
    <default class="link"><geom contype="0" conaffinity="0" rgba="0.95 0.75 0.2 1"/></default>
    <default class="pad"><geom rgba="0.15 0.15 0.15 1"/></default>
  </default>
  <asset><texture type="skybox" builtin="gradient" rgb1="0.7 0.75 0.8" rgb2="0.3 0.3 0.35" width="32"
                  height="32"/></asset>
  <worldbody>
    <light pos="0.2 0 1.5" dir="0 0 -1" directional="true" castshadow="false"/>
    <geom name="table" type="box" size="0.6 0.6 0.02" pos="0.2 0 -0.02" rgba="0.82 0.8 0.76 1"/>
    <camera name="front" pos="0.5 0 0.3" xyaxes="{_look_at([0.5, 0, 0.3], [0.15, 0, 0.03])}" fovy="50"/>
    {arm}
    <body name="cube" pos="0.2 0 {half}"><freejoint/>
      <geom name="cube" type="box" size="{half} {half} {half}" mass="{CUBE_MASS_KG}" rgba="0.85 0.15 0.15 1"/>
    </body>
  </worldbody>
  <actuator>{servos}</actuator>
</mujoco>"""


# ------------------------------------------------------------------------------------------------
# The world: MuJoCo behind the emulated servos. A servo's encoder reads 2048 at its joint's 0 rad
# (the "new calibration" convention: mid-range is 2048); Present_Position = encoder - Homing_Offset
# and the servo drives its encoder to Goal_Position + Homing_Offset, as on a real STS3215.
class SimWorld:
    """The world protocol (tick, reset_scene, extra_state, success) on MuJoCo physics."""

    def __init__(self, cfg, model, emulator, seed=None, assembly_ticks=(0,) * 6):
        """assembly_ticks: where each servo's encoder sat when the arm was built, against the joint's
        zero (by servo); the sim's own arm has none, a virtual arm as it arrives has some."""
        self.cfg, self.model, self.emulator, self.assembly_ticks = (cfg, model, emulator,
                                                                    np.asarray(assembly_ticks))
        self.data = mujoco.MjData(model)
        self.substeps = round(1.0 / (cfg.control_hz * model.opt.timestep))  # 50 x 2 ms at 10 Hz
        self.servo_ids = [JOINTS.index(model.actuator(i).name) + 1 for i in range(model.nu)]
        self.cube_qpos = model.jnt_qposadr[model.body("cube").jntadr[0]]
        self.cube_dof = model.jnt_dofadr[model.body("cube").jntadr[0]]
        self.cube_geom = model.geom("cube").id
        self.pad_geoms = (model.geom("fixed_pad").id, model.geom("moving_pad").id)
        self.tool_site = model.site("tool").id
        self.cube_low, self.cube_high = parse_workspace(cfg.cube_area_m)
        self.rng = np.random.default_rng(seed)
        self.reset_scene(seed)

    def tick(self, substeps=None):
        """Goal registers -> MuJoCo, one control period (or `substeps` physics steps) -> present registers."""
        for i, servo_id in enumerate(self.servo_ids):
            get = lambda name: self.emulator.get(servo_id, name)  # noqa: E731
            low, high = get("Min_Position_Limit"), get("Max_Position_Limit")
            goal = get("Goal_Position") if low == high == 0 else np.clip(get("Goal_Position"), low, high)
            self.data.ctrl[i] = ((goal + get("Homing_Offset") - self.assembly_ticks[servo_id - 1] - 2048)
                                 / TICKS_PER_RAD)
            # Torque off makes the joint limp; Torque_Limit (0.1 %) scales the servo's stall torque.
            torque_nm = STALL_TORQUE_NM * get("Torque_Limit") / 1000 * (get("Torque_Enable") > 0)
            self.model.actuator_forcerange[i] = (-torque_nm, torque_nm)
        mujoco.mj_step(self.model, self.data, nstep=self.substeps if substeps is None else substeps)
        self._write_present()
        return 0.0

    def _write_present(self):
        """Joint state -> Present_* registers of each emulated servo."""
        joint_q = self.data.qpos[self.model.actuator_trnid[:, 0]]
        joint_qd = self.data.qvel[self.model.jnt_dofadr[self.model.actuator_trnid[:, 0]]]
        for i, servo_id in enumerate(self.servo_ids):
            offset = self.emulator.get(servo_id, "Homing_Offset")
            force = self.data.actuator_force[i]
            limit = max(self.model.actuator_forcerange[i, 1], 1e-9)
            encoder = round(2048 + joint_q[i] * TICKS_PER_RAD) + self.assembly_ticks[servo_id - 1]
            self.emulator.set(servo_id, "Present_Position", (encoder - offset) % 4096)
            self.emulator.set(servo_id, "Present_Velocity",
                              int(np.clip(joint_qd[i] * TICKS_PER_RAD, -32767, 32767)))
            self.emulator.set(servo_id, "Present_Load", int(round(np.clip(force / limit, -1, 1) * 1000)))
            self.emulator.set(servo_id, "Moving", int(abs(joint_qd[i]) * TICKS_PER_RAD > 20))
            # Voltage and temperature stay at the emulator's 7.4 V / 25 C: the sim has no battery or heat.

    def reset_scene(self, seed=None):
        """The arm put (not driven) at HOME_RAD, gripper open, as a person resets the scene; a new cube."""
        mujoco.mj_resetData(self.model, self.data)
        arm_q = np.append(HOME_RAD, SO101_CHAIN[-1][6][1])  # gripper fully open, as SO101Env.reset wants
        self.data.qpos[self.model.actuator_trnid[:, 0]] = arm_q
        self.data.ctrl[:] = arm_q
        self.place_cube(self.rng if seed is None else np.random.default_rng(seed))
        self._write_present()
        for servo_id in self.servo_ids:  # a servo holds where it is: goal = present
            self.emulator.set(servo_id, "Goal_Position", self.emulator.get(servo_id, "Present_Position"))

    def place_cube(self, rng):
        """The cube at rest at a random place in cube_area_m. Its yaw is its bearing from the base +-0.2 rad,
        so the radial jaws meet two faces, as a person would place it: the wrist cannot turn to any angle."""
        xy = rng.uniform(self.cube_low, self.cube_high)
        yaw = np.arctan2(xy[1], xy[0] - SO101_CHAIN[1][2][0]) + rng.uniform(-0.2, 0.2)
        self.data.qpos[self.cube_qpos:self.cube_qpos + 7] = [*xy, self.cfg.cube_size_m / 2,
                                                             np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]
        self.data.qvel[self.cube_dof:self.cube_dof + 6] = 0
        mujoco.mj_forward(self.model, self.data)

    def cube_pos(self):
        return self.data.qpos[self.cube_qpos:self.cube_qpos + 3].copy()

    def extra_state(self):
        """Privileged state for fast state-only training: cube position minus tool position (m)."""
        if not self.cfg.privileged_state:
            return np.zeros(0, np.float32)
        return (self.cube_pos() - self.data.site_xpos[self.tool_site]).astype(np.float32)

    def success(self):
        """Exactly from physics: both jaws touch the cube and its bottom is success_lift_m up."""
        pairs = [{contact.geom1, contact.geom2} for contact in self.data.contact[:self.data.ncon]]
        touching = set().union(*(pair for pair in pairs if self.cube_geom in pair))
        lifted = self.cube_pos()[2] - self.cfg.cube_size_m / 2 >= self.cfg.success_lift_m
        return lifted and all(pad in touching for pad in self.pad_geoms)


class SimCamera:
    """A MuJoCo camera with a real camera's interface: read() -> uint8 (S, S, 3) RGB, close(). The renderer
    (an OpenGL context) is made at the first read, so state-only runs never need GL."""

    def __init__(self, world, name):
        self.world, self.name, self.renderer = world, name, None

    def read(self):
        if self.renderer is None:
            size = self.world.cfg.image_size
            self.renderer = mujoco.Renderer(self.world.model, size, size)
        self.renderer.update_scene(self.world.data, camera=self.name)
        return self.renderer.render()

    def close(self):
        if self.renderer is not None:  # explicitly: a renderer left to the interpreter's exit raises
            self.renderer.close()
            self.renderer = None


def make_sim(cfg, seed=None):
    """The simulated SO-101 as (arm, cameras, world), ready for SO101Env(cfg, arm, cameras, world): robot.py's
    SO101 on a FeetechBus whose port is the emulator, set up as a real one would be, calibrated to the model's
    joint ranges (homing offset 0), so ticks map to MuJoCo radians."""
    world = SimWorld(cfg, mujoco.MjModel.from_xml_string(scene_xml(cfg)), ServoEmulator(IDS), seed)
    bus = FeetechBus(world.emulator, cfg.baudrate, cfg.read_retries, cfg.bus_latency_s)
    arm = SO101(bus, chain_calibration(), cfg.max_joint_step_rad)
    arm.connect()
    arm.configure()
    cameras = {name: SimCamera(world, name) for name in ("front", "wrist")}
    return arm, cameras, world


# ------------------------------------------------------------------------------------------------
# The scripted expert: the human of the sim. It reads the arm's state from the observation (what
# the robot measures) and the cube from the world (what a person sees), and answers in the policy's
# action space: EE delta in [-1, 1] (x ee_step_m) and a gripper command -1 close / 0 stay / +1 open.
class ScriptedExpert:
    """Above the cube -> descend -> close -> lift, with Gaussian noise; and when to intervene. act() keeps no
    memory, the phase is read from the state, so the expert can take over at any moment of an episode."""

    HOVER_M = 0.03        # clearance above the cube while moving to it
    MARGIN_M = 0.01       # gap left between the fixed jaw and the cube, so the jaw never lands on it
    ALIGNED_M = 0.005     # horizontal error under which the jaws are above the grasp point
    CLOSED_BELOW = 0.45   # gripper opening under which the jaws are closed (or holding the cube)
    PROGRESS_M = 0.005    # less than this much progress in expert_patience steps = astray or stalled

    def __init__(self, cfg, world, seed=None):
        self.cfg, self.world, self.rng = cfg, world, np.random.default_rng(seed)
        self.half = cfg.cube_size_m / 2
        self.grasp_z_m = parse_workspace(cfg.workspace_m)[0][2]  # close the jaws at the workspace floor
        self.reset()

    def reset(self):
        """Call at the start of every episode: forget the intervention history."""
        self.history, self.in_control, self.takeover_phase = [], False, 0

    def _situation(self, obs):
        """(tool position, cube position, where the tool should close, aligned above it, holding)."""
        tool, rot = forward_kinematics(obs["state"][:5])
        closed = obs["state"][5] < self.CLOSED_BELOW
        cube = self.world.cube_pos()
        # The tool point is the fixed jaw's tip; the moving jaw closes towards it along the tool's z.
        jaw_dir = np.array([rot[0, 2], rot[1, 2]]) / np.linalg.norm(rot[:2, 2])
        grasp = np.append(cube[:2] - jaw_dir * (self.half + self.MARGIN_M), self.grasp_z_m)
        # Descending is safe only with the fixed jaw beside the cube, not above it.
        beside = np.dot(cube[:2] - tool[:2], jaw_dir) > self.half + self.MARGIN_M / 2
        aligned = np.linalg.norm(grasp[:2] - tool[:2]) < self.ALIGNED_M and beside
        in_jaws = np.linalg.norm(cube[:2] - tool[:2] - jaw_dir * self.half) < self.half
        holding = closed and in_jaws and cube[2] > tool[2] - self.half
        return tool, cube, grasp, aligned, holding

    def act(self, obs):
        tool, cube, grasp, aligned, holding = self._situation(obs)
        hover_z = 2 * self.half + self.HOVER_M
        if holding:  # lift
            target, gripper = tool + [0, 0, 2 * self.cfg.ee_step_m], -1.0
        elif obs["state"][5] < self.CLOSED_BELOW:  # closed on nothing: open and rise
            target, gripper = np.append(tool[:2], max(tool[2], hover_z)), 1.0
        elif np.linalg.norm(grasp[:2] - tool[:2]) > 0.02:  # far: go above the grasp point
            target, gripper = np.append(grasp[:2], hover_z), 0.0
        elif not aligned:  # near: line up at this height
            target, gripper = np.append(grasp[:2], tool[2]), 0.0
        elif tool[2] > grasp[2] + 0.008:  # descend, still correcting sideways
            target, gripper = grasp, 0.0
        else:  # jaws around the cube: close, without moving
            target, gripper = tool, -1.0
        # Half the error per step: the servos lag their goals, so a full step would overshoot.
        delta = 0.5 * (target - tool) / self.cfg.ee_step_m + self.rng.normal(0, self.cfg.expert_noise, 3)
        return np.append(np.clip(delta, -1, 1), gripper).astype(np.float32)

    def _progress(self, obs):
        """(phase, distance): 0 reaching, 1 above the cube with the jaws open, 2 holding it; and how
        far from done (m): distance to the grasp pose, or the lift still missing while holding."""
        tool, cube, grasp, aligned, holding = self._situation(obs)
        if holding:
            return 2, max(0.0, self.cfg.success_lift_m - (cube[2] - self.half))
        phase = int(aligned and obs["state"][5] >= self.CLOSED_BELOW)
        return phase, self.cfg.success_lift_m + np.linalg.norm(grasp - tool)

    def read(self, obs):
        """As a teleop device (teleop.Teleop): its action, and "intervene" held while it wants control."""
        return self.act(obs), {"intervene"} if self.wants_control(obs) else set()

    def wants_control(self, obs):
        """Call once per step: True while the expert should act instead of the policy. It takes over when
        the policy made less than PROGRESS_M of progress in expert_patience steps (away from the cube, or
        stalled), and holds on to the episode's end, as a good operator does: the policy learns whole
        successes from it, and takeovers come later and fall away as it learns. With expert_holds_on false
        it hands back once the task reached its next phase (above the cube, then holding it), which an A/B
        at 2,000 steps found slower (README)."""
        phase, distance = self._progress(obs)
        self.history.append(distance)
        n = self.cfg.expert_patience
        if self.in_control and phase > self.takeover_phase and not self.cfg.expert_holds_on:
            self.history, self.in_control = [distance], False
        elif (not self.in_control and len(self.history) > n
              and distance > self.history[-1 - n] - self.PROGRESS_M):
            self.in_control, self.takeover_phase = True, phase
        return self.in_control


# ------------------------------------------------------------------------------------------------
# The virtual SO-101 (python sim.py serve): this twin in real time behind a pseudo-terminal that speaks the
# STS3215 protocol at the wire's pace, its cameras MJPEG streams on 127.0.0.1, driven through --port and
# --cameras as a real arm. It arrives uncalibrated: each encoder sits where the build left it. Where calibrate
# asks you to move the joints, GET /hand?pose=centre holds each joint mid-range, sweep moves them through
# their ranges, free lets go; GET /operator is a scripted you at the gamepad (--teleop virtual).
class VirtualArm:
    FPS, FRAME = 15, (320, 240)   # the camera streams: frames a second, width x height
    PERIOD_S = 0.01               # the physics thread advances this much time per step, on the clock

    def __init__(self, cfg, seed=0):
        self.cfg, self.rng = cfg, np.random.default_rng(seed)
        model = mujoco.MjModel.from_xml_string(scene_xml(cfg))
        model.vis.global_.offwidth, model.vis.global_.offheight = self.FRAME
        self.emulator = ServoEmulator(IDS)   # factory settings: no offsets, no limits
        self.world = SimWorld(cfg, model, self.emulator, seed, self.rng.integers(-300, 300, len(IDS)))
        self.lock = threading.Lock()         # bus, physics and cameras share the emulator and MjData
        self.hand, self.frames, self.running, self.faults = "free", {}, True, 0   # faults: injected so far
        self.holding = False   # the hand has the arm
        self.expert, self.start_reads = ScriptedExpert(cfg, self.world, seed), 0
        self.controller, self._servant = os.openpty()
        for fd in (self.controller, self._servant):
            tty.setraw(fd)
        self.port = os.ttyname(self._servant)
        self.http = ThreadingHTTPServer(("127.0.0.1", cfg.serve_http_port), self._handler())
        self.threads = [threading.Thread(target=target, daemon=True) for target in
                        (self._serve_bus, self._serve_physics, self._serve_cameras, self.http.serve_forever)]
        for thread in self.threads:
            thread.start()

    def _serve_bus(self):
        """Bytes from the port to the emulated servos; their replies back after the servo's reply delay
        (Return_Delay_Time, 2 us units) and the wire time at the baud rate, faulty at serve_fault_rate."""
        while self.running:
            ready = select.select([self.controller], [], [], 0.001)[0]
            with self.lock:
                if ready:
                    if self.rng.random() < self.cfg.serve_fault_rate:
                        self.faults += 1
                        self.emulator.inject(int(self.rng.integers(1, 7)), str(self.rng.choice(FAULTS)))
                    self.emulator.write(os.read(self.controller, 4096))
                replies, delay_s = self.emulator.read(4096), 2e-6 * self.emulator.get(1, "Return_Delay_Time")
            if replies:   # late ones too, once their time has come
                time.sleep(delay_s + len(replies) * 10 / self.cfg.baudrate)
                os.write(self.controller, replies)

    def _serve_physics(self):
        """PERIOD_S of physics per PERIOD_S of clock while any servo has torque. Else the arm is held: by the
        hand, or where it was left (simplified: a limp arm would sink through the table). The hand moves it
        without physics, through table and cube, so, told to let go, it first brings it to the centre."""
        actuated = self.world.model.actuator_trnid[:, 0]
        qpos, qvel = self.world.model.jnt_qposadr[actuated], self.world.model.jnt_dofadr[actuated]
        low, high = self.world.model.jnt_range[actuated].T
        start = next_s = time.monotonic()
        while self.running:
            with self.lock:
                self.holding = self.holding or self.hand != "free"
                torque = any(self.emulator.get(i, "Torque_Enable") for i in IDS)
                if not self.holding and torque:
                    self.world.tick(round(self.PERIOD_S / self.world.model.opt.timestep))
                else:
                    if self.holding:   # sweep: each joint end to end, at its own pace; at most 6 rad/s
                        elapsed = time.monotonic() - start
                        share = np.sin(elapsed / (0.4 + 0.1 * np.arange(len(low)))) * (self.hand == "sweep")
                        error = (low + high) / 2 + share * (high - low) / 2 - self.world.data.qpos[qpos]
                        self.world.data.qpos[qpos] += np.clip(error, -0.06, 0.06)
                        self.holding = self.hand != "free" or np.abs(error).max() > 1e-3
                    self.world.data.qvel[qvel] = 0
                    mujoco.mj_forward(self.world.model, self.world.data)
                    self.world._write_present()
            next_s += self.PERIOD_S
            time.sleep(max(0.0, next_s - time.monotonic()))

    def operate(self, state, reset):
        """The human at the gamepad, scripted -> (act, held): after a reset it puts the cube back, lets go of
        intervene and presses it (the episode starts); then the expert drives, holding intervene while it
        wants control, and success while the physics says the cube is lifted."""
        with self.lock:
            if reset:
                self.world.place_cube(self.world.rng)
                self.expert.reset()
                self.start_reads = 0
            obs = {"state": np.asarray(state, np.float32)}
            act, self.start_reads = self.expert.act(obs), self.start_reads + 1
            pressed = self.start_reads == 2 or (self.start_reads > 2 and self.expert.wants_control(obs))
            held = {"intervene"} if pressed else set()
            return act, held | ({"success"} if self.world.success() else set())

    def _serve_cameras(self):
        """Both cameras FPS times a second, as JPEG for the streams (the renderer lives in this thread)."""
        import cv2
        renderer = mujoco.Renderer(self.world.model, self.FRAME[1], self.FRAME[0])
        while self.running:
            for name in ("front", "wrist"):
                with self.lock:
                    renderer.update_scene(self.world.data, camera=name)
                self.frames[name] = cv2.imencode(".jpg", renderer.render()[:, :, ::-1])[1].tobytes()
            time.sleep(1 / self.FPS)
        renderer.close()

    def _handler(self):
        arm = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path, _, query = self.path.strip("/").partition("?")
                if path == "hand" and query.removeprefix("pose=") in ("centre", "sweep", "free"):
                    arm.hand = query.removeprefix("pose=")
                    self.send_response(200)
                    return self.end_headers()
                if path == "operator":
                    fields = dict(item.partition("=")[::2] for item in query.split("&"))
                    act, held = arm.operate([float(v) for v in fields["state"].split(",")], "reset" in fields)
                    self.send_response(200)
                    self.end_headers()
                    return self.wfile.write(json.dumps({"act": act.tolist(), "held": sorted(held)}).encode())
                if path not in arm.frames:
                    return self.send_error(404, "/front, /wrist, /hand?pose=centre|sweep|free "
                                                "or /operator?state=..")
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                while arm.running:
                    jpeg = arm.frames[path]
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n"
                                         b"Content-Length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg))
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    time.sleep(1 / arm.FPS)

            def log_message(self, *args):   # quiet: a request a frame would flood the terminal
                pass
        return Handler

    def close(self):
        """Stop, as the serve process's end does: the camera streams end and the port's far end closes, which
        its user sees as a pulled cable."""
        self.running = False
        self.threads[0].join()   # the bus's thread first: it reads the port's far end, closed next
        os.close(self.controller)
        os.close(self._servant)
        self.http.shutdown()
        self.http.server_close()
        for thread in self.threads[1:]:
            thread.join()


if __name__ == "__main__":
    cfg, words = load_config()
    if words != ["serve"]:
        raise SystemExit("usage: python sim.py serve [--serve_fault_rate 0.05] [--serve_http_port 8101]")
    arm, url = VirtualArm(cfg, cfg.seed), f"http://127.0.0.1:{cfg.serve_http_port}"
    print(f"a virtual SO-101, uncalibrated, on --port {arm.port} --cameras front={url}/front,"
          f"wrist={url}/wrist\nits hand (calibrate asks you to move the joints): {url}/hand?pose=centre, "
          f"sweep or free; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        arm.close()
