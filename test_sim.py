"""Tests of sim.py: the simulated SO-101 behind robot.py's bus and env, and the scripted expert."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the first mujoco import

import numpy as np  # noqa: E402

from config import Config  # noqa: E402
from robot import IDS, TICKS_PER_RAD, SO101Env  # noqa: E402
from sim import ScriptedExpert, make_sim  # noqa: E402


def run_episode(env, expert, seed, policy=None):
    """One episode, the expert acting alone or when it wants control; returns (info, steps, interventions)."""
    obs = env.reset(seed)
    expert.reset()
    interventions = 0
    for step in range(1, env.cfg.episode_steps + 1):
        takeover = policy is not None and expert.wants_control(obs)
        interventions += takeover
        act = expert.act(obs) if policy is None or takeover else policy(obs)
        obs, rew, terminated, truncated, info = env.step(act)
        if terminated or truncated:
            return info, step, interventions


def test_goal_written_through_the_driver_is_reached_in_mujoco():
    cfg = Config()
    arm, _, world = make_sim(cfg, seed=0)
    arm.torque(True)
    pan = IDS[0]
    start_rad = world.data.qpos[0]
    goal_ticks = 2048 + round((start_rad + 0.5) * TICKS_PER_RAD)
    arm.bus.sync_write("Goal_Position", {pan: goal_ticks})  # one SYNC_WRITE packet over the emulated bus
    for _ in range(10):
        world.tick()
    assert abs(world.data.qpos[0] - (start_rad + 0.5)) < 0.01  # MuJoCo's joint got there
    present = arm.bus.sync_read("Present_Position", [pan])[0]  # and the driver reads it back
    assert abs(present - goal_ticks) <= 0.01 * TICKS_PER_RAD


def test_scripted_expert_succeeds_in_at_least_95_percent_of_50_random_episodes():
    cfg = Config()
    arm, cameras, world = make_sim(cfg, seed=1)
    expert = ScriptedExpert(cfg, world, seed=1)
    with SO101Env(cfg, arm, cameras, world) as env:
        successes = sum(run_episode(env, expert, seed)[0]["success"] for seed in range(100, 150))
    assert successes >= 48


def test_cube_is_lifted_by_the_jaws_and_falls_when_they_open():
    cfg = Config()
    arm, cameras, world = make_sim(cfg, seed=2)
    with SO101Env(cfg, arm, cameras, world) as env:
        info, _, _ = run_episode(env, ScriptedExpert(cfg, world, seed=2), seed=2)
        assert info["success"]
        lifted_bottom_m = world.cube_pos()[2] - cfg.cube_size_m / 2
        assert lifted_bottom_m >= cfg.success_lift_m
        for _ in range(5):  # open the jaws: a cube held by contact forces must fall back to the table
            env.step(np.array([0, 0, 0, 1], np.float32))
        assert world.cube_pos()[2] - cfg.cube_size_m / 2 < 0.005
        assert not world.success()


def test_reset_is_deterministic_under_a_seed():
    cfg = Config()
    runs = []
    for _ in range(2):
        arm, cameras, world = make_sim(cfg, seed=3)
        env = SO101Env(cfg, arm, cameras, world)
        obs = [env.reset(seed=7)["state"]]
        obs += [env.step(np.array([0.5, -0.3, -1, -1], np.float32))[0]["state"] for _ in range(5)]
        runs.append((np.array(obs), world.cube_pos()))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])
    env.reset(seed=8)
    assert not np.allclose(world.cube_pos(), runs[0][1])  # another seed, another cube position


def test_expert_leaves_a_good_policy_alone_and_takes_over_a_stalling_one():
    cfg = Config()
    arm, cameras, world = make_sim(cfg, seed=4)
    with SO101Env(cfg, arm, cameras, world) as env:
        expert = ScriptedExpert(cfg, world, seed=4)
        good_policy = ScriptedExpert(cfg, world, seed=5).act
        info, steps, interventions = run_episode(env, expert, seed=4, policy=good_policy)
        assert info["success"] and interventions == 0
        stalling_policy = lambda obs: np.zeros(4, np.float32)  # noqa: E731
        info, steps, interventions = run_episode(env, expert, seed=4, policy=stalling_policy)
        assert info["success"]  # the expert's takeovers finish the task
        assert 0 < interventions < steps  # but it handed control back in between


def test_cameras_return_uint8_rgb_frames_of_image_size():
    cfg = Config(use_images=True, image_size=64)
    arm, cameras, world = make_sim(cfg, seed=5)
    with SO101Env(cfg, arm, cameras, world) as env:
        obs = env.reset(seed=5)
    for name in ("front", "wrist"):
        assert obs[name].shape == (64, 64, 3) and obs[name].dtype == np.uint8
        assert obs[name].std() > 10  # a scene, not a blank frame
