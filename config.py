"""Every hyperparameter and setting of hilserl-so101, in one dataclass.

This is the bottom of the import graph: every other file reads its settings from a `Config`.
Each field says what it means, its unit, and where its default comes from:
  hil-serl  = rail-berkeley/hil-serl (the HIL-SERL paper's code, JAX)
  RLPD      = Ball et al. 2023, "Efficient Online RL with Offline Data"
  LeRobot   = huggingface/lerobot's SO-100/101 HIL-SERL port
  lessons   = a real SO-101 run whose failures taught these defaults
Any field can be overridden on the command line: `python hilserl.py --utd_ratio 10`.
"""

import dataclasses
import json
import math
import os
import re
import sys


@dataclasses.dataclass
class Config:
    # --- run -----------------------------------------------------------------------------
    seed: int = 0                        # seeds numpy, torch and the sim's cube placement
    device: str = "auto"                 # "auto" = cuda when available, else cpu
    demos: str = "data/demos.npz"        # demo file (a saved ReplayBuffer); recorded in sim when missing
    compile: bool = False                # fast.py's update: torch.compile + CUDA graphs (GPU); ~30 s to build
    run_dir: str = ""                    # where logs, plots and checkpoints go; empty = runs/<date>-<time>
    resume: str = ""                     # a run folder to continue from its last checkpoint
    eval: str = ""                       # run folder whose policy to evaluate (no learning, no interventions)
    eval_episodes: int = 20              # episodes per evaluation
    max_env_steps: int = 0               # stop training after this many control steps; 0 = until quit
    checkpoint_every: int = 10           # episodes between checkpoints (also written on exit)
    plot: str = ""                       # "RUN_A,RUN_B,out.png": plot runs' curves side by side, then exit
    diagnose_after_steps: int = 2000     # after this many steps, say which diagnostic is off (lessons)
    video_every: int = 25                # film every Nth training episode to videos/ (--eval: each); 0 = none

    # --- SAC / RLPD learning ----------------------------------------------------------------
    utd_ratio: int = 20                  # critic updates per control step (RLPD; lessons: 2 is far too few)
    batch_size: int = 256                # transitions per update, half demo + half online (hil-serl)
    discount: float = 0.97               # gamma (hil-serl launcher)
    tau: float = 0.005                   # soft target update rate (hil-serl)
    lr: float = 3e-4                     # Adam step size: actor, critics, grasp critic, alpha (hil-serl)
    temperature_init: float = 0.01       # initial temperature alpha (hil-serl launcher; lessons: 0.2 shakes)
    num_critics: int = 2                 # critic ensemble size, clipped-min target (hil-serl)
    hidden_dim: int = 256                # width of the two hidden layers of every MLP (hil-serl)
    state_latent_dim: int = 64           # state encoder output width (hil-serl proprio encoder)
    actor_std_min: float = 1e-5          # lower clip of the actor's std (hil-serl)
    actor_std_max: float = 5.0           # upper clip of the actor's std (hil-serl launcher)
    training_starts: int = 100           # online transitions collected before updates begin (hil-serl)
    replay_capacity: int = 100_000       # online ring buffer size, transitions (LeRobot)
    demo_capacity: int = 100_000         # demo ring buffer size, transitions (LeRobot)

    # --- images (networks.py) ------------------------------------------------------------------
    encoder: str = "resnet10"            # cameras: resnet10 (pretrained, frozen; hil-serl); small (DrQ)
    augment: bool = True                 # frames shifted at random, pad 4 (DrQ; hil-serl crops every batch)
    resnet_weights: str = ""             # ResNet-10 .safetensors (HF lerobot/resnet10); empty = download once
    image_latent_dim: int = 256          # features per camera after the image head (hil-serl)
    classifier: str = ""                 # reward classifier file; if set, it too judges success (hil-serl)
    classifier_threshold: float = 0.7    # success when sigmoid(logit) > this (hil-serl USB task)
    classifier_steps: int = 150          # gradient steps of 128 positive + 128 negative frames (hil-serl)
    classifier_floor: str = "0.9,0.5"    # held-out precision,recall needed to save it (classifier.py; ours)
    classifier_force: bool = False       # classifier.py: save it below the floor all the same
    frames: str = "data/frames.npz"      # frames labelled success or not (teleop.py label -> classifier.py)
    success_frames: int = 200            # label until the frames file holds this many successes (hil-serl)

    # --- reward and gripper -----------------------------------------------------------------
    reward_success: float = 10.0         # reward on success, which ends the episode (HIL-SERL; lessons)
    reward_step: float = -0.05           # reward on every other step (HIL-SERL; lessons: 0 lets it stall)
    grasp_penalty: float = -0.02         # grasp critic's reward for flipping the gripper (hil-serl USB task)

    # --- demos ------------------------------------------------------------------------------
    demo_episodes: int = 20              # demos recorded if no --demos file (hil-serl; lessons: 15 too few)
    demo_max_failures: int = 20          # failed episodes in a row after which recording gives up (ours)

    # --- robot (robot.py) ---------------------------------------------------------------------
    port: str = ""                       # serial port of the follower arm; empty = the simulated SO-101
    baudrate: int = 1_000_000            # STS3215 factory default (Feetech)
    calibration: str = "so101_calibration.json"  # calibration file (ours or LeRobot's follower JSON)
    control_hz: float = 10.0             # control rate (hil-serl, LeRobot)
    episode_steps: int = 100             # steps before an episode is truncated (gym-hil: 100 at 10 Hz)
    ee_step_m: float = 0.01              # metres per unit of EE-delta action per step (hil-serl RAM task)
    cameras: str = "front=0,wrist=2"     # name=index-or-path, comma separated
    image_size: int = 128                # camera frames are resized to image_size x image_size (hil-serl)
    camera_roi: str = ""                 # "front=x:y:w:h,..." px crop before resize; empty = none (hil-serl)
    # SAFETY: EE target box in the base frame (ours: the SO-101 reaches it all pointing down, within 20 deg)
    workspace_m: str = "0.15,0.30,-0.12,0.12,0.01,0.10"
    max_joint_step_rad: float = 0.1      # SAFETY: max arm-joint goal move per step (ours: 1 rad/s at 10 Hz)
    read_retries: int = 2                # bus retries of a bad reply before naming the servo (LeRobot #4207)
    bus_latency_s: float = 0.02          # USB + servo turnaround added to a reply's timeout (ESP32: 17-28 ms)
    max_temperature_c: float = 65.0      # SAFETY: stop when a servo is this hot (STS3215 cuts torque at 70 C)
    min_voltage_v: float = 6.0           # SAFETY: stop below this supply voltage (7.4 V STS3215; ~10 at 12 V)
    overload_s: float = 1.5              # SAFETY: stop on a stall this long, >= 80 % load (STS3215 trip: 2 s)

    # --- sim (sim.py) -------------------------------------------------------------------------
    privileged_state: bool = True        # sim only: add the cube position to the state (never on a real arm)
    use_images: bool = False             # put camera frames in the observations
    cube_size_m: float = 0.03            # edge of the sim's cube; 25-40 mm grasp reliably (measured)
    cube_area_m: str = "0.18,0.25,-0.08,0.08"  # where reset puts the cube, all of it reachable pointing down
    success_lift_m: float = 0.03         # sim success: cube in both jaws and this high (HIL-SERL: "lifted")
    sim_timestep_s: float = 0.002        # MuJoCo physics step; 50 per 10 Hz control step (SO-101 MJCF)
    expert_noise: float = 0.2            # Gaussian std on the scripted expert's EE action, so demos vary
    expert_patience: int = 5             # steps the policy may stray or stall before the expert takes over
    expert_holds_on: bool = True         # a takeover lasts to the episode's end (ours: README's A/B)
    serve_fault_rate: float = 0.0        # sim.py serve: share of arm replies dropped/corrupt/cut/garbled/late
    serve_http_port: int = 8101          # sim.py serve: its cameras and scripted hand answer here, 127.0.0.1

    # --- teleop (teleop.py) -------------------------------------------------------------------
    teleop: str = "auto"                 # who intervenes: gamepad, leader, expert/virtual (sim), or auto
    gamepad_layout: str = "auto"         # xbox or playstation buttons (pygame 2 docs); auto: by the pad name
    gamepad_map: str = ""                # "intervene=10,..." remaps (see python -m pygame.examples.joystick)
    dead_zone: float = 0.1               # deflection read as zero, so a resting stick won't drift (LeRobot)
    teleop_speed: float = 1.0            # full stick or held key = this share of the full action (ee_step_m)
    leader_port: str = ""                # serial port of an SO-101 leader arm used to intervene; empty = none
    leader_calibration: str = "so101_leader_calibration.json"  # leader arm's calibration (ours or LeRobot's)
    demo_keep_failed: bool = False       # also keep episodes not marked successful (hil-serl: successes only)
    lerobot_use_degrees: bool = True     # import-lerobot: degrees, not -100..100 (LeRobot default since 2026)


# What each setting must be, checked whenever settings are parsed: "OP BOUND", joined by "and".
RANGES = {"seed": ">= 0", "eval_episodes": ">= 1", "max_env_steps": ">= 0", "checkpoint_every": ">= 1",
          "diagnose_after_steps": ">= 0", "video_every": ">= 0", "utd_ratio": ">= 1", "batch_size": ">= 2",
          "discount": ">= 0 and <= 1", "tau": "> 0 and <= 1", "lr": "> 0", "temperature_init": "> 0",
          "num_critics": ">= 1", "hidden_dim": ">= 1", "state_latent_dim": ">= 1", "actor_std_min": "> 0",
          "actor_std_max": "> 0", "training_starts": ">= 1", "replay_capacity": ">= 2",
          "demo_capacity": ">= 2", "image_latent_dim": ">= 1", "classifier_threshold": ">= 0 and <= 1",
          "classifier_steps": ">= 1", "success_frames": ">= 1", "demo_episodes": ">= 1",
          "demo_max_failures": ">= 1", "baudrate": "> 0", "control_hz": "> 0", "episode_steps": ">= 1",
          "ee_step_m": "> 0", "image_size": ">= 32", "max_joint_step_rad": "> 0", "read_retries": ">= 0",
          "bus_latency_s": ">= 0", "max_temperature_c": "> 0", "min_voltage_v": ">= 0", "overload_s": "> 0",
          "cube_size_m": "> 0", "success_lift_m": "> 0", "sim_timestep_s": "> 0", "expert_noise": ">= 0",
          "expert_patience": ">= 1", "serve_fault_rate": ">= 0 and <= 1", "serve_http_port": ">= 1",
          "dead_zone": ">= 0 and < 1", "teleop_speed": "> 0 and <= 1"}
CHOICES = {"encoder": ("resnet10", "small"), "teleop": ("auto", "gamepad", "leader", "expert", "virtual"),
           "gamepad_layout": ("auto", "xbox", "playstation")}
BOXES = {"workspace_m": "x0,x1,y0,y1,z0,z1", "cube_area_m": "x0,x1,y0,y1"}   # each low < its high
ROI = r"\w+=\d+:\d+:[1-9]\d*:[1-9]\d*"   # a regular expression for each format, and how to say it
FORMATS = {"cameras": (r"\w+=[^,=]+(,\w+=[^,=]+)*", "name=index-or-path, comma separated"),
           "classifier_floor": (r"(0(\.\d+)?|1(\.0*)?),(0(\.\d+)?|1(\.0*)?)", "precision,recall, 0 to 1"),
           "camera_roi": (rf"({ROI}(,{ROI})*)?", "name=x:y:w:h in pixels (w, h at least 1), comma separated")}


def check(cfg):
    """Raise ValueError naming the first setting outside what it may be, its value and what is allowed."""
    compare = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
    for name in (f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), float)):
        if not math.isfinite(getattr(cfg, name)):   # NaN passes every comparison below
            raise ValueError(f"--{name} {getattr(cfg, name)}: must be a finite number")
    for name, rule in RANGES.items():
        value = getattr(cfg, name)
        pairs = [part.split() for part in rule.split(" and ")]   # [[">=", "0"], ["<=", "1"]]
        if not all(compare[op](float(value), float(bound)) for op, bound in pairs):
            raise ValueError(f"--{name} {value}: must be {rule}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} {getattr(cfg, name)!r}: must be one of {', '.join(allowed)}")
    for name, layout in BOXES.items():
        try:
            values = [float(v) for v in getattr(cfg, name).split(",")]
        except ValueError:
            values = []
        if len(values) != len(layout.split(",")) or any(lo >= hi for lo, hi in zip(values[0::2], values[1::2])):
            raise ValueError(f"--{name} {getattr(cfg, name)!r}: must be {layout} in metres, "
                             "each low below its high")
    for name, (pattern, say) in FORMATS.items():
        if not re.fullmatch(pattern, getattr(cfg, name)):
            raise ValueError(f"--{name} {getattr(cfg, name)!r}: must be {say}")
    names = [item.split("=")[0] for item in cfg.cameras.split(",")]
    unknown = {i.split("=")[0] for i in cfg.camera_roi.split(",") if i} - set(names)
    if unknown:
        raise ValueError(f"--camera_roi {cfg.camera_roi!r}: no camera {unknown.pop()!r} in --cameras "
                         f"{cfg.cameras!r}")
    if cfg.batch_size % 2:
        raise ValueError(f"--batch_size {cfg.batch_size}: must be even (half demo, half online)")
    if cfg.actor_std_min > cfg.actor_std_max:
        raise ValueError(f"--actor_std_min {cfg.actor_std_min}: must be at most --actor_std_max "
                         f"{cfg.actor_std_max}")
    if len(set(names)) < len(names):   # a dict of cameras would keep only the last of each name
        raise ValueError(f"--cameras {cfg.cameras!r}: each camera needs a name of its own")
    if cfg.control_hz * cfg.sim_timestep_s > 0.5:   # the sim rounds the physics steps per control step to 0
        raise ValueError(f"--control_hz {cfg.control_hz} with --sim_timestep_s {cfg.sim_timestep_s}: the sim "
                         "needs at least one physics step per control step; lower one of them")
    if cfg.training_starts >= cfg.replay_capacity:   # its last slot holds a frame, never a transition
        raise ValueError(f"--training_starts {cfg.training_starts}: must be below --replay_capacity "
                         f"{cfg.replay_capacity}, or no update would ever run")


def _parse_value(name, text, default):
    """Convert one command-line value to the type of the field's default."""
    if isinstance(default, bool):
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"--{name} expects true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"--{name} expects {type(default).__name__}, got {text!r}") from None


def parse_overrides(args, cfg=None):
    """Apply `--field value` pairs to a Config; return (cfg, leftover words).

    Words not starting with `--` are returned untouched so that programs can take positional
    arguments. Raises ValueError with a one-line message for an unknown field or a bad value.
    """
    cfg = cfg or Config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    leftover, args = [], list(args)
    while args:
        word = args.pop(0)
        if not word.startswith("--"):
            leftover.append(word)
            continue
        name, equals, value = word[2:].partition("=")
        if name not in fields:
            close = [f for f in fields if name.split("_")[0] in f]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise ValueError(f"unknown option --{name}{hint}; see config.py for every setting")
        if not equals and isinstance(getattr(cfg, name), bool) and (not args or args[0].startswith("--")):
            value = "true"                # a bare boolean flag: --compile
        elif not equals:                  # --name value (--name= is the empty value)
            if not args:
                raise ValueError(f"--{name} needs a value")
            value = args.pop(0)
        if not value and name in ("resume", "eval"):   # an empty shell variable must not start a new run
            raise ValueError(f"--{name} needs a run folder (runs/...), got ''")
        setattr(cfg, name, _parse_value(name, value, getattr(cfg, name)))
    return cfg, leftover


def warnings_for(cfg, num_demo_episodes=None):
    """One line per setting that the lessons file found to break learning on a real SO-101."""
    checks = [
        (cfg.temperature_init > 0.05, f"temperature_init {cfg.temperature_init} is far above hil-serl's "
                                      "0.01; expect shaky exploration and wasted interventions"),
        (cfg.utd_ratio < 10, f"utd_ratio {cfg.utd_ratio} is below 10; RLPD uses 20 and learning per sample "
                             "will be slow"),
        (cfg.reward_step >= 0, "reward_step is not negative; with no step penalty the policy has no reason "
                               "not to stall (HIL-SERL uses -0.05)"),
        (cfg.reward_success <= 1, f"reward_success {cfg.reward_success} is weak next to the step penalty "
                                  "(HIL-SERL uses +10)"),
        (num_demo_episodes is not None and num_demo_episodes < 20,
         f"only {num_demo_episodes} demo episodes; HIL-SERL uses 20-30"),
    ]
    return [f"warning: {text}" for bad, text in checks if bad]


def load_config(args=None, cfg=None):
    """Parse sys.argv (or `args`) onto cfg and check it; a bad option or value: print one line, exit 2."""
    try:
        cfg, words = parse_overrides(sys.argv[1:] if args is None else args, cfg)
        check(cfg)
        return cfg, words
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


def load_run_config(args):
    """hilserl.py's settings: a new run's, or those of the run folder being resumed or evaluated (its
    config.json) with the command line on top. It takes no positional words."""
    cfg, words = load_config(args)
    if words:
        raise SystemExit(f"error: unexpected {words[0]!r}: hilserl.py takes only --setting value options "
                         "(see config.py)")
    folder = cfg.resume or cfg.eval
    if not folder:
        return cfg
    if cfg.resume and cfg.eval:
        raise SystemExit(f"error: --eval {cfg.eval} and --resume {cfg.resume}: pick one run folder")
    if any(word.split("=")[0] == "--demos" for word in args):   # its demo.npz is what it learned from
        raise SystemExit(f"error: --demos: {folder} keeps its own demos ({folder}/demo.npz); leave it out")
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        known = {f.name for f in dataclasses.fields(Config)}    # settings a newer version dropped are ignored
        saved = Config(**{k: v for k, v in saved.items() if k in known})
        if any(type(getattr(saved, k)) is not type(getattr(Config, k)) for k in known):
            raise ValueError("a setting of the wrong type")
    except (OSError, ValueError, AttributeError, TypeError):
        raise SystemExit(f"error: {path}: missing or not a config.json that hilserl.py wrote; pass a run "
                         "folder (runs/...), or restore its config.json") from None
    return load_config(args, dataclasses.replace(saved, resume=cfg.resume, eval=cfg.eval))[0]
