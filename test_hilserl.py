"""Tests of every file: the learning math, the buffers and config, the Feetech driver against the
servo emulator, the simulated SO-101, teleoperation and demo recording, and a short end-to-end run.

The learning tests compare each loss, target and update with a reference written out here in
float64 with explicit loops (a Python loop over the critics, LayerNorm from its definition): the
references share parameters with the code under test but none of its code.
Headless: SDL's dummy drivers and MuJoCo's EGL renderer (sim.py falls back to OSMesa).
Sections, one class each, in the spine's order and then the other files': TestUpdate, TestBuffer,
TestLoop, TestRunFolder, TestConfig, TestRobot, TestSim, TestTeleop, TestImages.
Run: `python -m pytest -q test_hilserl.py`; just the update's math: `python -m pytest -q test_hilserl.py -k update`.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")   # before the first mujoco import
os.environ["SDL_VIDEODRIVER"] = "dummy"     # before pygame starts
os.environ["SDL_AUDIODRIVER"] = "dummy"

import collections  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import runpy  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import buffer  # noqa: E402
import classifier  # noqa: E402
import config  # noqa: E402
import diagnostics  # noqa: E402
import fast  # noqa: E402
import hilserl  # noqa: E402
import robot  # noqa: E402
import sim  # noqa: E402
import teleop  # noqa: E402
from config import Config  # noqa: E402
from networks import Agent  # noqa: E402
from robot import EE_DIM, IDS, TICKS_PER_RAD, FeetechBus, ServoEmulator, SO101Env  # noqa: E402
from sim import ScriptedExpert, make_sim  # noqa: E402

torch.set_num_threads(1)  # small tensors: one thread is faster and deterministic

# --- float64 references --------------------------------------------------------------------


def ref_layer_norm(h, gain, shift):
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + 1e-5) * gain + shift


def ref_mlp(seq, x):
    lin1, ln1, _, lin2, ln2, _, lin3 = seq
    h = torch.tanh(ref_layer_norm(x @ lin1.weight.T + lin1.bias, ln1.weight, ln1.bias))
    h = torch.tanh(ref_layer_norm(h @ lin2.weight.T + lin2.bias, ln2.weight, ln2.bias))
    return h @ lin3.weight.T + lin3.bias


def ref_encoder(enc, obs):
    lin, ln, _ = enc.state
    return torch.tanh(ref_layer_norm(obs["state"] @ lin.weight.T + lin.bias, ln.weight, ln.bias))


def ref_critics(ens, z, act):
    """One critic at a time, in a Python loop: (E, B)."""
    x = torch.cat([z, act], -1)
    out = []
    for e in range(ens.weights[0].shape[0]):
        h = x
        for layer in range(3):
            h = h @ ens.weights[layer][e] + ens.biases[layer][e, 0]
            if layer < 2:
                h = torch.tanh(ref_layer_norm(h, ens.ln_gains[layer][e, 0], ens.ln_shifts[layer][e, 0]))
        out.append(h[:, 0])
    return torch.stack(out)


def double(tree):
    if isinstance(tree, dict):
        return {k: double(v) for k, v in tree.items()}
    return tree.double()


# --- fixtures ----------------------------------------------------------------------------------
# the sim's state width: test_compile_happens_... finds test_fast_learner_...'s graphs in Inductor's cache
STATE_DIM = 12


def small_cfg(**overrides):
    cfg = config.Config(hidden_dim=16, state_latent_dim=8, batch_size=8, utd_ratio=3)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def random_batch(batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {"obs": {"state": torch.randn(batch_size, STATE_DIM, generator=g)},
         "next_obs": {"state": torch.randn(batch_size, STATE_DIM, generator=g)},
         "act": torch.cat([torch.rand(batch_size, EE_DIM, generator=g) * 2 - 1,
                           torch.randint(-1, 2, (batch_size, 1), generator=g).float()], -1),
         "rew": torch.randn(batch_size, generator=g),
         "grasp_penalty": torch.where(torch.rand(batch_size, generator=g) < 0.5, -0.02, 0.0),
         "terminated": torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])[:batch_size],
         "truncated": torch.tensor([0.0, 1, 0, 0, 0, 1, 0, 0])[:batch_size]}
    return b


def make_agent(cfg, seed=0, perturb_targets=True):
    torch.manual_seed(seed)
    agent = Agent(STATE_DIM, cfg)
    if perturb_targets:   # so that online and target nets differ, as they do after training starts
        with torch.no_grad():
            for p in agent.target_params:
                p.add_(0.3 * torch.randn_like(p))
    return agent




# =================================================================================================
# TestUpdate: hilserl.py's update and fast.py's: every loss, target and step against float64 or by hand.
# =================================================================================================


def reference_critic_losses(agent, b, next_act, cfg):
    """float64: clipped double-Q target without entropy, Double-DQN grasp target with the penalty."""
    a, b = copy.deepcopy(agent).double(), double(b)
    next_act = next_act.double()
    z_next_t = ref_encoder(a.target["encoder"], b["next_obs"])
    q_next = ref_critics(a.target["critic"], z_next_t, next_act).min(0).values
    mask = 1 - b["terminated"]                                   # truncation does not stop bootstrapping
    y = b["rew"] + cfg.discount * mask * q_next
    online_next = ref_mlp(a.grasp_critic.net, ref_encoder(a.encoder, b["next_obs"]))
    best = online_next.argmax(-1)
    target_next = ref_mlp(a.target["grasp_critic"].net, z_next_t)
    y_grasp = b["rew"] + b["grasp_penalty"] + cfg.discount * mask * target_next[torch.arange(len(best)), best]
    z = ref_encoder(a.encoder, b["obs"])
    q = ref_critics(a.critic, z, b["act"][:, :EE_DIM])
    critic_loss = ((q - y) ** 2).mean()
    g = ref_mlp(a.grasp_critic.net, z)[torch.arange(len(y)), b["act"][:, EE_DIM].long() + 1]
    grasp_loss = ((g - y_grasp) ** 2).mean()
    return a, critic_loss, grasp_loss


def differentiated_reference(cfg):
    """An agent, a batch, a' and the float64 reference (its gradients computed) and critic loss."""
    agent, b = make_agent(cfg), random_batch()
    next_act = torch.rand(8, EE_DIM) * 2 - 1
    ref, critic_loss, grasp_loss = reference_critic_losses(agent, b, next_act, cfg)
    (critic_loss + grasp_loss).backward()
    return agent, b, next_act, ref, critic_loss


def run_critic_step(agent, b, next_act, cfg):
    return hilserl.critic_step(agent, hilserl.make_optimizers(agent, cfg)["critic"], b, next_act, cfg.discount, cfg.tau)


class FixedQ(torch.nn.Module):
    """A target critic whose values are given by hand."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, z, act):
        return self.values


class FixedGrasp(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values, self.dummy = values, torch.nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return self.values + 0 * self.dummy


def stacked(batch, times):
    return {k: {n: torch.stack([x] * times) for n, x in v.items()} if isinstance(v, dict) else torch.stack([v] * times)
            for k, v in batch.items()}


def adam_steps(optimizer):
    return {optimizer.state[p]["step"].item() for p in optimizer.param_groups[0]["params"]}



def control_step_flops(state_dim, cfg):
    """Matrix-multiply FLOPs of one control step's learning (2 per multiply-add; elementwise work ignored).

    A linear layer on n rows costs 2 n in out forward, as much again for the gradient of its
    input and for the gradient of its weights, when those are needed.
    """
    B, U, E, H, L, A = cfg.batch_size, cfg.utd_ratio, cfg.num_critics, cfg.hidden_dim, cfg.state_latent_dim, EE_DIM
    def fwd(rows, dims):
        return sum(2 * rows * i * o for i, o in zip(dims[:-1], dims[1:]))
    encoder, critic = fwd(B, [state_dim, L]), E * fwd(B, [L + A, H, H, 1])
    grasp, actor = fwd(B, [L, H, H, 3]), fwd(B, [state_dim, L, H, H, 2 * A])
    per_critic_update = (
        encoder + critic + encoder + grasp + grasp         # targets: target enc, critics; online enc, grasp; target grasp
        + 2 * encoder + 3 * critic + 3 * grasp)            # online: encoder fwd + weight grads; critics, grasp fwd + 2 bwd
    actor_update = (3 * actor - fwd(B, [state_dim, L])     # the state needs no gradient
                    + encoder + 2 * critic)       # critics: fwd + input grads (for the action), no weight grads
    return U * per_critic_update + U * actor + actor_update   # U*actor: next actions for every batch


class TestUpdate:
    """hilserl.py's update and fast.py's: every loss, target and step against float64 or by hand."""

    # --- the actor ---------------------------------------------------------------------------------
    def test_tanh_log_prob_matches_change_of_variables(self):
        cfg = small_cfg()
        agent = make_agent(cfg)
        obs = {"state": torch.randn(64, STATE_DIM) * 3}
        with torch.no_grad():
            agent.actor.net[-1].bias.copy_(torch.tensor([2.0, -1.0, 0.5, 0.3, -0.5, 1.2]))  # large means too
            torch.manual_seed(7)
            act, log_prob = agent.actor(obs)
            mean, log_std = agent.actor.net(agent.actor.encoder(obs)).double().chunk(2, -1)
            torch.manual_seed(7)
            noise = torch.randn_like(mean.float()).double()
        std = log_std.clamp(math.log(cfg.actor_std_min), math.log(cfg.actor_std_max)).exp()
        u = mean + std * noise
        # log pi(a) = log N(u; mean, std) - sum log(1 - tanh(u)^2), in float64 from the definition
        expected = (torch.distributions.Normal(mean, std).log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
        assert torch.allclose(act.double(), torch.tanh(u), atol=1e-6)
        assert torch.allclose(log_prob.double(), expected, atol=1e-4)

    def test_log_prob_stays_finite_when_the_action_saturates(self):
        cfg = small_cfg()
        agent = make_agent(cfg)
        with torch.no_grad():
            agent.actor.net[-1].bias.copy_(torch.tensor([30.0, -30.0, 30.0, -3.0, -3.0, -3.0]))
            _, log_prob = agent.actor({"state": torch.zeros(4, STATE_DIM)})
        assert torch.isfinite(log_prob).all()

    def test_actor_std_is_clipped_to_the_configured_bounds(self):
        cfg = small_cfg(actor_std_max=0.5)
        agent = make_agent(cfg)
        with torch.no_grad():
            agent.actor.net[-1].bias[EE_DIM:] = 20.0      # log_std far above log(0.5)
            torch.manual_seed(1)
            act, _ = agent.actor({"state": torch.zeros(4000, STATE_DIM)})
            mean, _ = agent.actor.net(agent.actor.encoder({"state": torch.zeros(1, STATE_DIM)})).chunk(2, -1)
        u = torch.atanh(act.double().clamp(-1 + 1e-12, 1 - 1e-12))
        assert abs(u.std(0).mean().item() - 0.5) < 0.05

    # --- the critic update -------------------------------------------------------------------------
    def test_critic_and_grasp_losses_match_float64_reference(self):
        cfg = small_cfg()
        agent, b = make_agent(cfg), random_batch()
        next_act = torch.rand(8, EE_DIM) * 2 - 1
        ref, critic_loss, grasp_loss = reference_critic_losses(agent, b, next_act, cfg)
        info = run_critic_step(agent, b, next_act, cfg)
        assert math.isclose(info["loss/critic"].item(), critic_loss.item(), rel_tol=1e-5)
        assert math.isclose(info["loss/grasp_critic"].item(), grasp_loss.item(), rel_tol=1e-5)

    def test_critic_step_logs_the_q_of_demo_rows_and_of_online_rows_apart(self):
        cfg = small_cfg()
        agent, b = make_agent(cfg), random_batch()            # rows 0-3 stand for demo rows, 4-7 for online ones
        ref, b64 = copy.deepcopy(agent).double(), double(b)
        q = ref_critics(ref.critic, ref_encoder(ref.encoder, b64["obs"]), b64["act"][:, :EE_DIM]).mean(0)   # before the step
        stats = run_critic_step(agent, b, torch.rand(8, EE_DIM) * 2 - 1, cfg)
        assert math.isclose(stats["q/demo"].item(), q[:4].mean().item(), rel_tol=1e-5)
        assert math.isclose(stats["q/online"].item(), q[4:].mean().item(), rel_tol=1e-5)

    def test_critic_gradients_match_float64_reference(self):
        cfg = small_cfg()
        agent, b, next_act, ref, _ = differentiated_reference(cfg)
        losses = hilserl.critic_losses(agent, b, next_act, cfg.discount)
        (losses[0] + losses[1]).backward()                  # what critic_step differentiates
        assert list(agent.critic_params) == list(ref.critic_params)
        for mine, theirs in zip(agent.critic_params.values(), ref.critic_params.values()):
            assert torch.allclose(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)

    def test_target_is_clipped_min_and_stops_only_at_termination(self):
        cfg = small_cfg(discount=0.9)
        agent, b = make_agent(cfg), random_batch(4)
        b["rew"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        b["terminated"] = torch.tensor([0.0, 1.0, 0.0, 0.0])
        b["truncated"] = torch.tensor([0.0, 0.0, 1.0, 0.0])
        agent.target["critic"] = FixedQ(torch.tensor([[5.0, 5.0, 7.0, -1.0], [3.0, 6.0, 8.0, 2.0]]))
        # by hand: min over critics = [3, 5, 7, -1]; row 1 terminated -> no bootstrap; row 2 truncated -> bootstraps
        y = torch.tensor([1 + 0.9 * 3, 2.0, 3 + 0.9 * 7, 4 + 0.9 * -1])
        with torch.no_grad():
            q = agent.critic(agent.encoder(b["obs"]), b["act"][:, :EE_DIM])
        critic_loss, _, _ = hilserl.critic_losses(agent, b, torch.zeros(4, EE_DIM), cfg.discount)
        assert math.isclose(critic_loss.item(), ((q - y) ** 2).mean().item(), rel_tol=1e-6)

    def test_grasp_target_is_double_dqn_with_the_penalty(self):
        cfg = small_cfg(discount=0.5)
        agent, b = make_agent(cfg), random_batch(2)
        b["rew"], b["terminated"] = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
        b["grasp_penalty"] = torch.tensor([-0.02, -0.02])
        b["act"][:, EE_DIM] = torch.tensor([1.0, -1.0])            # classes 2 and 0
        online = FixedGrasp(torch.tensor([[0.0, 9.0, 1.0], [4.0, 0.0, 0.0]]))
        agent.grasp_critic = online                                # online argmax on s': class 1 (row 0)
        agent.target["grasp_critic"] = FixedQ(None)
        agent.target["grasp_critic"].forward = lambda z: torch.tensor([[50.0, 2.0, 70.0], [1.0, 1.0, 1.0]])
        # by hand: row 0: 1 - 0.02 + 0.5 * Qtarget(s', argmax_online = 1) = 0.98 + 1.0 (not 0.5 * max 70)
        #          row 1: terminated -> 1 - 0.02
        y = torch.tensor([1.98, 0.98])
        q_taken = torch.tensor([1.0, 4.0])                         # online values of the taken classes
        _, grasp_loss, _ = hilserl.critic_losses(agent, b, torch.zeros(2, EE_DIM), cfg.discount)
        assert math.isclose(grasp_loss.item(), ((q_taken - y) ** 2).mean().item(), rel_tol=1e-6)

    def test_soft_target_update_moves_targets_by_tau(self):
        cfg = small_cfg(tau=0.1)
        agent, b = make_agent(cfg), random_batch()
        before = [p.detach().double().clone() for p in agent.target_params]
        run_critic_step(agent, b, torch.zeros(8, EE_DIM), cfg)
        for old, new, online in zip(before, agent.target_params, agent.critic_params.values()):
            expected = (1 - 0.1) * old + 0.1 * online.detach().double()   # online after its update
            assert torch.allclose(new.double(), expected, atol=1e-6)

    def test_target_update_leaves_no_autograd_history(self):
        cfg = small_cfg()
        agent = make_agent(cfg)
        for _ in range(2):
            run_critic_step(agent, random_batch(), torch.zeros(8, EE_DIM), cfg)
        for p in agent.target_params:
            assert p.is_leaf and not p.requires_grad and p.grad_fn is None

    def test_fast_critic_gradients_match_float64_reference(self):
        cfg = small_cfg()
        agent, b, next_act, ref, critic_loss = differentiated_reference(cfg)
        compiled = torch.compile(torch.no_grad()(fast.gradients))                      # torch.func.grad, compiled
        grads, losses = compiled(fast.Losses(agent, hilserl.critic_losses), agent.critic_params, b, next_act, cfg.discount)
        assert math.isclose(losses[0].item(), critic_loss.item(), rel_tol=1e-5)
        assert list(grads) == list(ref.critic_params)
        for mine, theirs in zip(grads.values(), ref.critic_params.values()):
            assert torch.allclose(mine.double(), theirs.grad, rtol=1e-4, atol=1e-6)

    def test_compiled_critic_step_matches_the_spine(self):
        cfg = small_cfg()
        agent = make_agent(cfg)
        twin = copy.deepcopy(agent)
        optimizer, twin_optimizer = hilserl.make_optimizers(agent, cfg)["critic"], hilserl.make_optimizers(twin, cfg)["critic"]
        adam = fast.AdamState(twin_optimizer, twin)
        for seed in range(3):
            b, next_act = random_batch(seed=seed), torch.rand(8, EE_DIM) * 2 - 1
            eager = hilserl.critic_step(agent, optimizer, b, next_act, cfg.discount, cfg.tau)
            compiled = fast.compiled_critic_step(fast.Losses(twin, hilserl.critic_losses), adam, b, next_act, cfg.discount, cfg.tau)
            for key in eager:
                assert torch.allclose(eager[key], compiled[key], rtol=1e-5, atol=1e-6)
        for (name, e), c in zip(agent.state_dict().items(), twin.state_dict().values()):
            assert torch.allclose(e, c, rtol=1e-4, atol=1e-6), name
        for p, q in zip(agent.critic_params.values(), twin.critic_params.values()):   # torch.optim's own state, stepped
            mine, theirs = optimizer.state[p], twin_optimizer.state[q]
            assert mine["step"].item() == theirs["step"].item() == 3
            assert torch.allclose(mine["exp_avg_sq"], theirs["exp_avg_sq"], rtol=1e-4, atol=1e-12)

    def test_compiled_actor_step_matches_the_spine(self):
        cfg = small_cfg()
        agent = make_agent(cfg)
        twin = copy.deepcopy(agent)
        optimizers, twin_optimizers = hilserl.make_optimizers(agent, cfg), hilserl.make_optimizers(twin, cfg)
        adams = [fast.AdamState(twin_optimizers[k], twin) for k in ("actor", "temperature")]
        with torch._inductor.config.patch(fallback_random=True):                       # eager's random numbers
            step = torch.compile(lambda *args: fast.actor_step(*args))                 # compiled afresh, with them
            for seed in range(3):
                obs = random_batch(seed=seed)["obs"]
                torch.manual_seed(seed)
                eager = hilserl.actor_step(agent, optimizers["actor"], optimizers["temperature"], obs, -2.0)
                torch.manual_seed(seed)
                with torch.no_grad():
                    compiled = step(fast.Losses(twin, hilserl.actor_losses), *adams, obs, -2.0)
                for key in eager:
                    assert torch.allclose(eager[key], compiled[key], rtol=1e-5, atol=1e-6), key
        for (name, e), c in zip(agent.state_dict().items(), twin.state_dict().values()):
            assert torch.allclose(e, c, rtol=1e-4, atol=1e-6), name

    def test_compiled_next_actions_match_eager(self):
        cfg = small_cfg()
        actor, next_obs = make_agent(cfg).actor, random_batch()["next_obs"]
        with torch._inductor.config.patch(fallback_random=True):                       # eager's random numbers
            compiled = torch.compile(lambda actor, obs: hilserl.next_actions(actor, obs))   # as fast.py does
            torch.manual_seed(1)
            eager = hilserl.next_actions(actor, next_obs)
            torch.manual_seed(1)
            assert torch.allclose(eager, compiled(actor, next_obs), atol=1e-5)

    # --- the actor and temperature update ----------------------------------------------------------
    def test_actor_loss_and_gradient_match_float64_reference(self):
        cfg = small_cfg()
        agent, b = make_agent(cfg), random_batch()
        ref = copy.deepcopy(agent).double()
        torch.manual_seed(3)
        actor_loss, _, _ = hilserl.actor_losses(agent, b["obs"], hilserl.TARGET_ENTROPY)
        grads = torch.autograd.grad(actor_loss, list(agent.actor.parameters()))
        obs = double(b["obs"])
        h = ref_encoder(ref.actor.encoder, obs)
        mean, log_std = ref_mlp(ref.actor.net, h).chunk(2, -1)
        std = log_std.clamp(math.log(cfg.actor_std_min), math.log(cfg.actor_std_max)).exp()
        torch.manual_seed(3)
        u = mean + std * torch.randn(mean.shape).double()
        act = torch.tanh(u)
        log_prob = (torch.distributions.Normal(mean, std).log_prob(u) - torch.log(1 - act ** 2)).sum(-1)
        q_mean = ref_critics(ref.critic, ref_encoder(ref.encoder, obs).detach(), act).mean(0)   # mean, not min
        loss = (cfg.temperature_init * log_prob - q_mean).mean()
        loss.backward()
        assert math.isclose(actor_loss.item(), loss.item(), rel_tol=1e-4)
        for mine, theirs in zip(grads, ref.actor.parameters()):
            assert torch.allclose(mine.double(), theirs.grad, rtol=1e-3, atol=1e-6)

    def test_actor_step_trains_the_actor_and_alpha_only(self):
        cfg = small_cfg()
        agent = make_agent(cfg)
        opts = hilserl.make_optimizers(agent, cfg)
        before = copy.deepcopy(agent.state_dict())
        hilserl.actor_step(agent, opts["actor"], opts["temperature"], random_batch()["obs"], hilserl.TARGET_ENTROPY)
        changed = {k.split(".")[0] for k, v in agent.state_dict().items() if not torch.equal(before[k], v)}
        assert changed == {"actor", "log_alpha"}

    @pytest.mark.parametrize("log_std_bias, alpha_should", [(-0.5, "fall"), (-6.0, "rise")])
    def test_temperature_gradient_sign(self, log_std_bias, alpha_should):
        cfg = small_cfg()
        agent = make_agent(cfg)
        with torch.no_grad():
            agent.actor.net[-1].weight.zero_()
            agent.actor.net[-1].bias.copy_(torch.tensor([0.0, 0, 0, log_std_bias, log_std_bias, log_std_bias]))
        opts = hilserl.make_optimizers(agent, cfg)
        alpha_before = agent.log_alpha.exp().item()
        obs = {"state": torch.randn(256, STATE_DIM)}
        torch.manual_seed(5)
        _, temperature_loss, info = hilserl.actor_losses(agent, obs, -2.0)
        (grad,) = torch.autograd.grad(temperature_loss, [agent.log_alpha])
        # d/dlog_alpha [alpha (H - Htarget)] = alpha (H - Htarget): positive when the policy is too random
        expected_grad = alpha_before * (info["entropy"].item() + 2.0)
        assert math.isclose(grad.item(), expected_grad, rel_tol=1e-5)
        torch.manual_seed(5)
        hilserl.actor_step(agent, opts["actor"], opts["temperature"], obs, -2.0)
        alpha_after = agent.log_alpha.exp().item()
        assert (alpha_after < alpha_before) if alpha_should == "fall" else (alpha_after > alpha_before)

    def test_target_entropy_is_minus_half_the_action_dimension(self):
        assert hilserl.TARGET_ENTROPY == -2.0    # 3 EE dims + 1 gripper

    def test_learn_does_utd_critic_updates_then_one_actor_update(self):
        cfg = small_cfg(utd_ratio=5)
        agent = make_agent(cfg)
        optimizers = hilserl.make_optimizers(agent, cfg)
        hilserl.learn(agent, optimizers, cfg, stacked(random_batch(), 5))
        assert [adam_steps(optimizers[k]) for k in ("critic", "actor", "temperature")] == [{5}, {1}, {1}]

    def test_benchmark_floor_counts_the_matmuls_learn_runs(self):
        cfg = small_cfg(utd_ratio=3)
        agent = make_agent(cfg)
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            hilserl.learn(agent, hilserl.make_optimizers(agent, cfg), cfg, stacked(random_batch(), 3))
        assert control_step_flops(STATE_DIM, cfg) == counter.get_total_flops()

    def test_compile_without_a_cpp_compiler_is_a_one_line_error(self, monkeypatch):
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setattr(fast.shutil, "which", lambda name: None)
        with pytest.raises(SystemExit, match="needs a C.. compiler"):
            fast.check_compiler(torch.device("cpu"))

    def test_fast_learner_matches_the_spine_and_leaves_the_agent_as_it_found_it(self):
        """Same losses and parameters after a few control steps; compiling (real updates) is undone."""
        cfg = small_cfg(utd_ratio=3)
        agent = make_agent(cfg)
        twin = copy.deepcopy(agent)
        optimizers, twin_optimizers = hilserl.make_optimizers(agent, cfg), hilserl.make_optimizers(twin, cfg)
        batches = [stacked(random_batch(seed=seed), 3) for seed in range(4)]
        torch._dynamo.reset()                                       # compiled afresh, with eager's random numbers:
        with torch._inductor.config.patch(fallback_random=True):    # the same a' and actions in both
            learner = fast.Learner(twin, twin_optimizers, cfg, batches[0])
        for name, p in agent.state_dict().items():
            assert torch.equal(p, twin.state_dict()[name]), name                      # untouched by the warm-up
        assert all(adam_steps(o) == {0} for o in twin_optimizers.values())
        for seed, b in enumerate(batches[1:]):
            torch.manual_seed(seed)
            eager = hilserl.learn(agent, optimizers, cfg, b)
            torch.manual_seed(seed)
            compiled = learner(b)
            for key in eager:
                assert torch.allclose(eager[key], compiled[key], rtol=1e-4, atol=1e-5), key
        for name, p in agent.state_dict().items():
            assert torch.allclose(p, twin.state_dict()[name], rtol=1e-4, atol=1e-5), name
        assert [adam_steps(twin_optimizers[k]) for k in ("critic", "actor", "temperature")] == [{9}, {3}, {3}]

    # --- fast.py's Adam, on torch.optim's state -------------------------------------------------------
    def test_fast_adam_matches_torch_optim_adam(self):
        torch.manual_seed(0)
        ours, theirs = torch.nn.ParameterList([torch.randn(5, 3), torch.randn(4)]), None
        theirs = copy.deepcopy(ours)
        adam = fast.AdamState(torch.optim.Adam(ours, lr=0.01), ours)
        reference = torch.optim.Adam(theirs, lr=0.01)
        for step in range(6):
            grads = [torch.randn_like(p) * 10.0 ** (step - 3) for p in ours]   # changing scales: bias correction shows
            with torch.no_grad():
                adam.step(grads)
            for p, g in zip(theirs, grads):
                p.grad = g.clone()
            reference.step()
        for mine, expected in zip(ours, theirs):
            assert torch.allclose(mine, expected, rtol=1e-6, atol=1e-7)

    def test_fast_adam_first_step_by_hand(self):
        # after bias correction m_hat = g and v_hat = g^2: the first step is -lr g / (|g| + eps)
        params = torch.nn.ParameterList([torch.tensor([1.0, -2.0, 0.5])])
        with torch.no_grad():
            fast.AdamState(torch.optim.Adam(params, lr=0.1), params).step([torch.tensor([0.3, -4.0, 0.0])])
        assert torch.allclose(params[0], torch.tensor([1.0 - 0.1, -2.0 + 0.1, 0.5]), atol=1e-6)


# =================================================================================================
# TestBuffer: buffer.py: the ring, frames stored once, the half-demo batch, files.
# =================================================================================================


def frame_obs(t, image=True):
    obs = {"state": np.full(3, t, np.float32)}
    if image:
        obs["front"] = np.full((4, 4, 3), t % 256, np.uint8)
    return obs


def fill(buf, steps, episode_len, start=0):
    for t in range(start, start + steps):
        end = (t + 1) % episode_len == 0
        buf.add(frame_obs(t), np.array([t, 0, 0, 1], np.float32), float(t), frame_obs(t + 1),
                terminated=end, truncated=False, intervened=t % 2 == 0, grasp_penalty=-0.02 * (t % 3 == 0))


class TestBuffer:
    """buffer.py: the ring, frames stored once, the half-demo batch, files."""

    def test_batch_is_half_demo_half_online(self):
        demo, online = buffer.ReplayBuffer(50, frame_obs(0), 4), buffer.ReplayBuffer(50, frame_obs(0), 4)
        fill(demo, 20, 5)
        fill(online, 20, 5, start=1000)
        batches = buffer.sample_batches(demo, online, 3, 8, np.random.default_rng(0))
        assert batches["act"].shape == (3, 8, 4)
        assert (batches["act"][:, :4, 0] < 1000).all() and (batches["act"][:, 4:, 0] >= 1000).all()

    def test_ring_buffer_wraps_around_and_keeps_next_frames_right(self):
        buf = buffer.ReplayBuffer(10, frame_obs(0), 4)
        fill(buf, 37, episode_len=4)
        idx = buf.sample_indices(500, np.random.default_rng(0))
        b = buf.gather(idx)
        t = b["act"][:, 0]
        assert t.min() >= 37 - 10                                 # only the newest transitions survive
        assert (b["obs/front"][:, 0, 0, 0] == t % 256).all()
        assert (b["next_obs/front"][:, 0, 0, 0] == (t + 1) % 256).all()
        assert (b["next_obs/state"][:, 0] == t + 1).all()
        assert (b["rew"] == t).all()

    def test_last_step_of_an_episode_keeps_its_own_next_frame(self):
        buf = buffer.ReplayBuffer(20, frame_obs(0), 4)
        buf.add(frame_obs(0), np.zeros(4), 0.0, frame_obs(1), True, False, False)     # episode ends at frame 1
        buf.add(frame_obs(50), np.zeros(4), 0.0, frame_obs(51), False, False, False)  # next episode starts at 50
        b = buf.gather(np.array([0, 2]))
        assert list(b["next_obs/front"][:, 0, 0, 0]) == [1, 51]
        assert len(buf) == 2 and buf.num_episodes == 1

    def test_transitions_with_gaps_keep_their_next_frames(self):
        demo = buffer.ReplayBuffer(20, frame_obs(0), 4)     # the human acted at steps 5, 6 and 9 of one episode
        for t in (5, 6, 9):
            demo.add(frame_obs(t), np.array([t, 0, 0, 0], np.float32), 0.0, frame_obs(t + 1), False, False, True)
        b = demo.gather(demo.sample_indices(100, np.random.default_rng(0)))
        assert (b["next_obs/front"][:, 0, 0, 0] == b["act"][:, 0] + 1).all() and len(demo) == 3

    def test_save_load_round_trip(self, tmp_path):
        buf = buffer.ReplayBuffer(12, frame_obs(0), 4)
        fill(buf, 30, episode_len=6)
        buf.add(frame_obs(90), np.zeros(4), 0.0, frame_obs(91), False, False, True)     # an unfinished episode
        path = tmp_path / "demos.npz"
        buf.save(path)
        loaded = buffer.ReplayBuffer(40, frame_obs(0), 4)
        loaded.load(path)
        rng = np.random.default_rng(0)
        original = buf.gather(buf.sample_indices(300, rng))
        again = loaded.gather(loaded.sample_indices(300, rng))
        key = lambda b: sorted(zip(b["act"][:, 0], b["next_obs/front"][:, 0, 0, 0], b["intervened"], b["grasp_penalty"]))
        assert set(key(original)) == set(key(again))
        assert not list(tmp_path.glob("*.tmp*"))                  # the temporary file was renamed

    def test_save_is_atomic_when_writing_fails(self, tmp_path, monkeypatch):
        buf = buffer.ReplayBuffer(8, frame_obs(0), 4)
        fill(buf, 4, 4)
        path = tmp_path / "demos.npz"
        buf.save(path)
        before = path.read_bytes()
        monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            buf.save(path)
        assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp*"))

    @pytest.mark.parametrize("break_it, message", [
        (lambda d: d.pop("act"), "missing key 'act'"),
        (lambda d: d.update(wrist=d["front"]), "unexpected key 'wrist'"),   # recorded with a camera this run lacks
        (lambda d: d.update(front=d["front"][:, :2]), "key 'front' is uint8[2, 2, 4, 3], expected uint8[2, 4, 4, 3]"),
        (lambda d: d.update(state=d["state"].astype(np.float64)), "key 'state' is float64"),
    ])
    def test_bad_files_name_the_key_and_what_was_expected(self, tmp_path, break_it, message):
        buf = buffer.ReplayBuffer(8, frame_obs(0), 4)
        buf.add(frame_obs(0), np.zeros(4), 0.0, frame_obs(1), True, False, False)
        buf.save(tmp_path / "good.npz")
        with np.load(tmp_path / "good.npz") as f:
            data = dict(f)
        break_it(data)
        np.savez(tmp_path / "bad.npz", **data)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            buffer.ReplayBuffer(8, frame_obs(0), 4).load(tmp_path / "bad.npz")

    def test_unreadable_or_too_big_files_are_clear_errors(self, tmp_path):
        (tmp_path / "junk.npz").write_text("not a zip")
        with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
            buffer.ReplayBuffer(8, frame_obs(0), 4).load(tmp_path / "junk.npz")
        big = buffer.ReplayBuffer(30, frame_obs(0), 4)
        fill(big, 20, 5)
        big.save(tmp_path / "big.npz")
        with pytest.raises(ValueError, match="raise --replay_capacity"):
            buffer.ReplayBuffer(8, frame_obs(0), 4).load(tmp_path / "big.npz")

    def test_truncated_nan_or_pickled_files_are_one_line_that_never_advises_unpickling(self, tmp_path):
        buf = buffer.ReplayBuffer(30, frame_obs(0), 4)
        fill(buf, 20, 5)
        buf.save(tmp_path / "good.npz")
        data = (tmp_path / "good.npz").read_bytes()
        (tmp_path / "truncated.npz").write_bytes(data[:len(data) // 2])
        arrays = dict(np.load(tmp_path / "good.npz"))
        arrays["rew"][3] = np.nan
        np.savez(tmp_path / "nan.npz", **arrays)
        np.savez(tmp_path / "pickled.npz", **{**arrays, "act": np.array([{"code": 1}] * len(arrays["act"]))})
        with open(tmp_path / "array.npz", "wb") as f:                               # an .npy under an .npz name
            np.save(f, arrays["rew"])
        for name, message in [("truncated", "not a readable .npz file"), ("nan", "key 'rew' holds NaN"),
                              ("pickled", "not a readable .npz file"), ("missing", "not a readable .npz"),
                              ("array", "not a readable .npz file")]:
            with pytest.raises(ValueError, match=f"{name}.npz: {message}") as error:
                buffer.ReplayBuffer(30, frame_obs(0), 4).load(tmp_path / f"{name}.npz")
            assert "allow_pickle" not in str(error.value) and "\n" not in str(error.value)

    def test_images_are_stored_once_per_frame(self):
        obs = {"state": np.zeros(12, np.float32), "front": np.zeros((128, 128, 3), np.uint8),
               "wrist": np.zeros((128, 128, 3), np.uint8)}
        buf = buffer.ReplayBuffer(100_000, obs, 4)      # numpy allocates lazily: no memory is touched
        assert sum(a.nbytes for a in buf.arrays.values()) < 10e9
        assert "next_front" not in buf.arrays


# =================================================================================================
# TestLoop: hilserl.py's loop on the sim: train, resume, evaluate, compile before the first episode.
# =================================================================================================


class TestLoop:
    """hilserl.py's loop on the sim: train, resume, evaluate, compile before the first episode."""

    # --- the whole loop on the sim -----------------------------------------------------------------
    def test_end_to_end_training_then_resume_then_eval(self, tmp_path, monkeypatch, capsys):
        demos, run = tmp_path / "demos.npz", tmp_path / "run"
        small = ["--hidden_dim", "32", "--state_latent_dim", "16", "--batch_size", "32", "--utd_ratio", "2",
                 "--training_starts", "60", "--checkpoint_every", "2", "--demo_episodes", "3", "--episode_steps", "50",
                 "--replay_capacity", "2000", "--demo_capacity", "2000"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(demos), "--run_dir", str(run),
                                         "--max_env_steps", "200", *small])
        hilserl.main()
        recorded = buffer.ReplayBuffer(2000, {"state": np.zeros(12, np.float32)}, 4)
        recorded.load(demos)
        assert recorded.num_episodes == 3 and recorded.arrays["intervened"][recorded.arrays["valid"]].all()
        rows = list(csv.DictReader(open(run / "log.csv")))
        steps = int(rows[-1]["env_steps"])
        assert steps >= 200 and {"loss/critic", "q/demo", "q/online", "alpha", "intervention_rate", "servo/max_load", "q/episode", "return/mc"} <= set(rows[-1])
        assert (run / "curves.png").stat().st_size > 10_000 and (run / "checkpoint.pt").exists()
        demo = buffer.ReplayBuffer(2000, {"state": np.zeros(12, np.float32)}, 4)
        demo.load(run / "demo.npz")
        assert len(demo) == len(recorded)                           # the demos as the run started
        episodes = [dict(np.load(p)) for p in sorted(run.glob("episodes/episode_*.npz"))]
        assert [int(e["log/episode"]) for e in episodes] == list(range(1, len(rows) + 1))
        human = sum(int(e["intervened"][e["valid"]].sum()) for e in episodes)
        assert sum(int(e["valid"].sum()) for e in episodes) == steps and 0 < human < steps   # the expert corrected some
        logged = sum(float(r["intervention_rate"]) * int(r["length"]) for r in rows)
        assert round(logged) == human
        start = hilserl.start_run(hilserl.load_run_config(["--resume", str(run)]), {"state": np.zeros(12, np.float32)}, run)
        assert len(start.online) == steps and len(start.demo) == len(recorded) + human   # a corrected step is a demo too
        assert start.rows == [{k: (int(v) if k in ("episode", "env_steps", "length") else float(v))
                               for k, v in r.items() if v} for r in rows]

        monkeypatch.setattr("sys.argv", ["hilserl.py", "--resume", str(run), "--max_env_steps", "300"])
        hilserl.main()
        rows_after = list(csv.DictReader(open(run / "log.csv")))
        assert rows_after[:len(rows)] == rows and int(rows_after[-1]["env_steps"]) >= 300
        assert int(rows_after[len(rows)]["episode"]) == len(rows) + 1
        capsys.readouterr()
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--eval", str(run), "--eval_episodes", "2"])
        hilserl.main()
        assert re.search(r"success \d+% over 2 episodes, mean length [\d.]+ steps", capsys.readouterr().out)

    def test_a_non_finite_update_stops_the_run_without_saving_the_poisoned_agent(self, tmp_path, monkeypatch):
        calls, learn = [], hilserl.learn
        def poisoned_after_40(*args):
            stats = learn(*args)
            calls.append(1)
            return {**stats, "loss/critic": stats["loss/critic"] * (float("nan") if len(calls) > 40 else 1)}
        monkeypatch.setattr(hilserl, "learn", poisoned_after_40)
        run = tmp_path / "run"
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1",
                 "--training_starts", "20", "--demo_episodes", "2", "--episode_steps", "30", "--checkpoint_every", "1"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "d.npz"), "--run_dir", str(run),
                                         "--max_env_steps", "150", *small])
        with pytest.raises(SystemExit, match=r"the update's loss/critic is nan in episode \d+; training stopped and saved"):
            hilserl.main()
        saved = torch.load(run / "checkpoint.pt")
        assert saved["progress"]["updates"] <= 40                                       # from before the poison
        assert all(torch.isfinite(p).all() for p in saved["agent"].values())

    @pytest.mark.parametrize("ending", ["max_env_steps", "ctrl_c"])
    def test_torque_goes_off_before_the_last_checkpoint_is_written(self, ending, tmp_path, monkeypatch):
        envs, make_env, save, run_episode = [], hilserl.make_env, hilserl.save_checkpoint, hilserl.run_episode
        torque = []                                          # torque on at each save of the checkpoint?
        monkeypatch.setattr(hilserl, "make_env", lambda *a: envs.append(make_env(*a)) or envs[-1])
        monkeypatch.setattr(hilserl, "save_checkpoint", lambda run: torque.append(
            any(envs[-1].arm.bus.port.get(i, "Torque_Enable") for i in IDS)) or save(run))
        if ending == "ctrl_c":
            monkeypatch.setattr(hilserl, "run_episode", lambda run, *a: (_ for _ in ()).throw(KeyboardInterrupt())
                                if run.progress["episode"] == 2 else run_episode(run, *a))
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1",
                 "--training_starts", "20", "--demo_episodes", "2", "--episode_steps", "30", "--checkpoint_every", "1"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "d.npz"), "--run_dir",
                                         str(tmp_path / "run"), "--max_env_steps", "90", *small])
        with pytest.raises(SystemExit) if ending == "ctrl_c" else contextlib.nullcontext():
            hilserl.main()
        assert torque[0] and torque[-1] is False                      # on while training, off before the last save

    def test_a_lost_arm_saves_what_was_learned_and_says_what_to_check_and_how_to_resume(self, tmp_path, monkeypatch):
        envs, make_env, run_episode = [], hilserl.make_env, hilserl.run_episode
        def lost(*a):                                                  # the cable pulled: pyserial's error on every write
            raise OSError(5, "Input/output error")
        def episode(run, env, *a):
            if run.progress["episode"] == 3:                           # torque-off fails with it
                env.arm.bus.port.write = lost
            return run_episode(run, env, *a)
        monkeypatch.setattr(hilserl, "make_env", lambda *a: envs.append(make_env(*a)) or envs[-1])
        monkeypatch.setattr(hilserl, "run_episode", episode)
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1",
                 "--training_starts", "20", "--demo_episodes", "2", "--episode_steps", "30", "--checkpoint_every", "10"]
        run = tmp_path / "run"
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "d.npz"), "--run_dir", str(run), *small])
        with pytest.raises(SystemExit) as exit_info:
            hilserl.main()
        assert torch.load(run / "checkpoint.pt")["progress"]["episode"] == 3   # not the first one's 0
        message = str(exit_info.value)
        assert "\n" not in message and re.fullmatch(
            r"error: the arm's serial port .*failed \(\[Errno 5\] Input/output error\): check its USB cable and the "
            rf"arm's power; then continue with: python hilserl.py --resume {re.escape(str(run))}", message), message

    @pytest.mark.parametrize("slow, says", [
        ("learn", "the most is updates: lower --utd_ratio or train on a GPU"),
        ("act", "the most is act: train on a GPU, or lower --image_size"),
        ("read_joints", r"the most is robot I/O \(bus, cameras\): check --baudrate, --bus_latency_s")])
    def test_a_loop_late_for_its_tick_says_which_part_takes_the_most(self, slow, says, tmp_path, monkeypatch, capsys):
        def slowed(original):
            return lambda *a, **k: time.sleep(0.05) or original(*a, **k)
        owner = {"learn": hilserl, "act": Agent, "read_joints": robot.SO101}[slow]
        monkeypatch.setattr(owner, slow, slowed(getattr(owner, slow)))
        tick = sim.SimWorld.tick
        monkeypatch.setattr(sim.SimWorld, "tick", lambda *a: tick(*a) or 0.01)   # every step late, as a real clock says
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1",
                 "--training_starts", "1", "--demo_episodes", "2", "--episode_steps", "30"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "d.npz"), "--run_dir",
                                         str(tmp_path / "run"), "--max_env_steps", "30", *small])
        hilserl.main()
        warnings = [line for line in capsys.readouterr().out.splitlines() if "cannot keep" in line]
        assert len(warnings) == 1 and re.fullmatch(r"warning: the loop cannot keep 10.0 Hz: act \d+ ms, robot I/O \d+ ms, "
                                                   rf"1 updates \d+ ms per step; {says}.*", warnings[0]), warnings

    def test_compile_happens_before_the_first_episode_and_never_again(self, tmp_path, monkeypatch):
        torch._dynamo.reset()                                         # forget graphs other tests compiled
        graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
        before_loop, status = [], hilserl.StatusLine                 # made as the loop starts
        monkeypatch.setattr(hilserl, "StatusLine", lambda: before_loop.append(graphs()) or status())
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "8", "--utd_ratio", "2",
                 "--training_starts", "20", "--demo_episodes", "2", "--episode_steps", "30", "--compile", "true",
                 "--expert_holds_on", "false"]                       # the untrained policy times out: 3 episodes
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "demos.npz"), "--run_dir",
                                         str(tmp_path / "run"), "--max_env_steps", "90", *small])
        # small_cfg's sizes and test_fast_learner_...'s Inductor config: its graphs are in Inductor's cache
        with torch._inductor.config.patch(fallback_random=True):
            hilserl.main()
        assert len(list(csv.DictReader(open(tmp_path / "run" / "log.csv")))) == 3
        assert before_loop == [graphs()] and graphs() >= 2            # the critic step and the next-action draw


# =================================================================================================
# TestRunFolder: hilserl.py's run folder: checkpoints that resume with either update path.
# =================================================================================================


def trained(cfg, seed=0):
    agent = make_agent(cfg, seed)
    optimizers = hilserl.make_optimizers(agent, cfg)
    hilserl.learn(agent, optimizers, cfg, stacked(random_batch(seed=seed), cfg.utd_ratio))
    return agent, optimizers


def checkpoint_run(cfg, folder, agent, optimizers):
    buffers = [buffer.ReplayBuffer(10, {"state": np.zeros(STATE_DIM, np.float32)}, 4) for _ in range(2)]
    return hilserl.Run(cfg, folder, torch.device("cpu"), agent, optimizers, None, *buffers, None, None,
                       {"episode": 7}, [], None)


def assert_same_training_state(agent, optimizers, other, other_optimizers):
    for (name, mine), restored in zip(agent.state_dict().items(), other.state_dict().values()):
        assert torch.equal(mine, restored), name
    for key, optimizer in optimizers.items():
        for p, q in zip(optimizer.param_groups[0]["params"], other_optimizers[key].param_groups[0]["params"]):
            assert all(torch.equal(optimizer.state[p][k], other_optimizers[key].state[q][k]) for k in optimizer.state[p])


class TestRunFolder:
    """hilserl.py's run folder: checkpoints that resume with either update path."""

    # --- what a run shows: diagnostics, their diagnosis, videos -----------------------------------------
    def test_episode_diagnostics_match_hand_computed_values(self):
        episode = buffer.ReplayBuffer(10, {"state": np.zeros(2, np.float32)}, 4)
        rews, human, gripper = [-0.05, -0.05, -0.05, -0.05, 10.0], [0, 1, 1, 0, 1], [0.4, -1, 0, -0.7, 0.6]
        for t in range(5):   # with --grasp_penalty 0: no step pays for the gripper, yet it closes at 1 and opens at 4
            episode.add({"state": np.zeros(2)}, [0, 0, 0, gripper[t]], rews[t], {"state": np.zeros(2)}, t == 4, False, human[t], 0.0)
        proposed = np.array([[1, 0, 0, 1], [0.5, -1, 0, 0], [0, 0, 0, -1], [0.995, 0, 0.98, 0], [0, 0, 0, 1]])
        d = diagnostics.episode_diagnostics(episode, proposed, np.array([1.0, 2, 3, 4, 5]), discount=0.9)
        # returns from the end: 10, -0.05 + 0.9 * 10 = 8.95, 8.005, 7.1545, 6.38905 (the buffer keeps float32)
        assert math.isclose(d["return/mc"], (10 + 8.95 + 8.005 + 7.1545 + 6.38905) / 5, rel_tol=1e-6) and d["q/episode"] == 3.0
        assert d["action/saturated"] == 3 / 15 and d["gripper/flips"] == 2            # saturated: 1, -1, 0.995 of 15
        assert (d["intervention/count"], d["intervention/mean_length"], d["intervention/first_step"]) == (2, 1.5, 1)

    def test_episode_q_is_the_critics_mean_q_of_the_actions_taken(self):
        cfg = small_cfg()
        agent, episode, g = make_agent(cfg), buffer.ReplayBuffer(10, {"state": np.zeros(STATE_DIM, np.float32)}, 4), np.random.default_rng(0)
        for t in range(4):
            episode.add({"state": g.normal(size=STATE_DIM)}, g.uniform(-1, 1, 4), 0.0, {"state": g.normal(size=STATE_DIM)}, t == 3, False, False)
        ref, a = copy.deepcopy(agent).double(), episode.arrays
        obs, act = torch.from_numpy(a["state"][:4]).double(), torch.from_numpy(a["act"][:4, :EE_DIM]).double()
        expected = ref_critics(ref.critic, ref_encoder(ref.encoder, {"state": obs}), act).mean(0)
        assert np.allclose(diagnostics.episode_q(agent, episode), expected.detach().numpy(), rtol=1e-5)

    def test_diagnosis_names_the_quantity_that_is_off_and_its_usual_cause(self):
        cfg = config.Config(diagnose_after_steps=1000, temperature_init=0.2)
        healthy = {"intervention_rate": 0.05, "success": 1.0, "q/episode": 7.0, "return/mc": 6.5, "entropy": -2.0, "alpha": 0.01,
                   "action/saturated": 0.05, "gripper/flips": 1, "intervention/count": 1, "intervention/mean_length": 3}
        rows = lambda n=40, **late: [{"env_steps": 100 * (i + 1), **healthy, **(late if i >= n - 20 else {})} for i in range(n)]
        assert diagnostics.diagnose(rows(), cfg, -2.0) == []
        cases = {"the intervention rate is hardly falling (5% -> 50%)": {"intervention_rate": 0.5},
                 "the critics overestimate: Q +5.5 above": {"q/episode": 12.0},
                 "more random than its target (entropy 0.0 vs -2.0, alpha 0.100)": {"entropy": 0.0, "alpha": 0.1},
                 "50% of the policy's motions are at the +-1 bound": {"action/saturated": 0.5},
                 "the gripper flips 7.5 times an episode": {"gripper/flips": 7.5}}
        assert diagnostics.diagnose(rows(**{"intervention/mean_length": 25}), cfg, -2.0) == []   # holding on is no fault
        for message, late in cases.items():
            [hint] = diagnostics.diagnose(rows(**late), cfg, -2.0)
            assert message in hint and "\n" not in hint, hint
        assert "temperature_init too high (now 0.2" in diagnostics.diagnose(rows(entropy=0.0), cfg, -2.0)[0]
        assert diagnostics.diagnose(rows(39, intervention_rate=0.5), cfg, -2.0) == []        # too early to tell
        trend = lambda early, late: diagnostics.diagnose([{**r, "intervention_rate": early if i < 20 else late}
                                                          for i, r in enumerate(rows())], cfg, -2.0)
        assert "hardly falling (43% -> 41%)" in trend(0.43, 0.41)[0]                          # less than a tenth
        assert trend(0.43, 0.35) == [] and trend(0.11, 0.12) == []                   # falling; low already
        assert diagnostics.diagnose(rows(**{"q/episode": 12.0, "success": 0.0}), cfg, -2.0) == []   # timed out: no tail

    def test_training_films_every_video_every_episodes_and_eval_films_each(self, tmp_path, monkeypatch):
        import cv2
        run, small = tmp_path / "run", ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16",
                                        "--utd_ratio", "1", "--training_starts", "30", "--demo_episodes", "2",
                                        "--episode_steps", "20", "--video_every", "2", "--max_env_steps", "80"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "demos.npz"), "--run_dir", str(run), *small])
        hilserl.main()
        rows = list(csv.DictReader(open(run / "log.csv")))
        assert sorted(p.name for p in (run / "videos").iterdir()) == ["episode_000002.webm", "episode_000004.webm"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--eval", str(run), "--eval_episodes", "2"])
        hilserl.main()
        assert sorted(p.name for p in (run / "videos").glob("eval_*")) == ["eval_001.webm", "eval_002.webm"]
        video = cv2.VideoCapture(str(run / "videos" / "episode_000002.webm"))
        frames = [video.read()[1] for _ in range(int(rows[1]["length"]))]
        assert video.read()[0] is False and all(f.shape == (128 + 44, 256, 3) for f in frames)   # two cameras
        human = [round(float(rows[1]["intervention_rate"]) * len(frames))]
        red = [f[2, 128, 2] > 150 and f[2, 128, 0] < 100 for f in frames]    # the border's red marks the human's steps
        assert sum(red) == human[0] and all(f[128:].max() > 200 for f in frames)   # and every frame has its text

    def test_a_run_with_cameras_films_its_frames_side_by_side(self, tmp_path):
        import cv2
        obs = {"state": np.zeros(3, np.float32), "front": np.full((64, 64, 3), (200, 40, 40), np.uint8),
               "wrist": np.full((64, 64, 3), (40, 40, 200), np.uint8)}                   # RGB: red, blue
        video, picture = diagnostics.episode_video(tmp_path / "v" / "e.webm", None, obs, fps=10)
        for step in range(3):
            video.add(picture(obs), step + 1, np.array([0.5, -1, 0, 1]), False, step == 2)
        video.close()
        capture, frames = cv2.VideoCapture(str(tmp_path / "v" / "e.webm")), []
        while (frame := capture.read()[1]) is not None:
            frames.append(frame)
        assert len(frames) == 3 and frames[0].shape == (2 * 64 + 44, 2 * 128, 3)  # 128 wide: doubled for the text
        left, right = frames[0][20:100, 20:100].mean((0, 1)), frames[0][20:100, 150:230].mean((0, 1))   # BGR
        assert left[2] > 150 > left[0] and right[0] > 150 > right[2]

    def test_a_resume_refuses_a_folder_with_missing_episode_files_and_a_folder_in_use(self, tmp_path, monkeypatch):
        run = tmp_path / "run"
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1",
                 "--training_starts", "20", "--demo_episodes", "2", "--episode_steps", "30",
                 "--expert_holds_on", "false"]                        # the untrained policy times out: 3 episodes
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "d.npz"), "--run_dir", str(run),
                                         "--max_env_steps", "90", *small])
        hilserl.main()                                                                # 3 episodes, checkpoint at 3
        with buffer.lock_run_folder(run):                                             # another run holds it
            monkeypatch.setattr("sys.argv", ["hilserl.py", "--resume", str(run)])
            with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(run))} is in use by another run; wait"):
                hilserl.main()
        (run / "episodes" / "episode_000002.npz").unlink()
        with pytest.raises(SystemExit, match=r"episodes: episode files 2 are missing; restore them from a copy"):
            hilserl.main()
        for path in (run / "episodes").iterdir():
            path.unlink()
        with pytest.raises(SystemExit, match=r"episodes: episode files 1, 2, 3 are missing"):   # the checkpoint's 3
            hilserl.main()

    def test_a_full_disk_keeps_the_last_checkpoint_and_file_and_says_what_they_need(self, tmp_path, monkeypatch):
        agent = Agent(STATE_DIM, small_cfg())
        run = types.SimpleNamespace(agent=agent, progress={"episode": 1}, folder=tmp_path, rows=[],
                                    optimizers=hilserl.make_optimizers(agent, small_cfg()))
        hilserl.save_checkpoint(run)
        before = (tmp_path / "checkpoint.pt").read_bytes()
        def full(*args, **kwargs):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        monkeypatch.setattr(torch, "save", full)
        run.progress = {"episode": 2}
        with pytest.raises(OSError, match=r"checkpoint.pt: not written \(PytorchStreamWriter failed .*\); it needs "
                                          r"about \d+ MB: free disk space, then --resume"):
            hilserl.save_checkpoint(run)
        assert (tmp_path / "checkpoint.pt").read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]
        buffer.save_npz(tmp_path / "e.npz", {"x": np.zeros(250_000)})
        monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match=r"e.npz: not written \(No space left on device\); it needs 4.0 MB: free disk"):
            buffer.save_npz(tmp_path / "e.npz", {"x": np.ones(500_000)})
        assert np.load(tmp_path / "e.npz")["x"].shape == (250_000,) and len(os.listdir(tmp_path)) == 2   # no .tmp

    def test_checkpoint_restores_the_agent_and_the_optimizers(self, tmp_path):
        cfg = small_cfg()
        agent, optimizers = trained(cfg)
        hilserl.save_checkpoint(checkpoint_run(cfg, tmp_path, agent, optimizers))
        fresh = make_agent(cfg, seed=1)
        fresh_optimizers = hilserl.make_optimizers(fresh, cfg)
        assert hilserl.load_checkpoint(tmp_path, fresh, fresh_optimizers) == {"episode": 7}
        assert_same_training_state(agent, optimizers, fresh, fresh_optimizers)

    def test_a_run_saved_by_either_path_resumes_with_the_other(self, tmp_path):
        cfg = small_cfg(utd_ratio=2)
        agent, optimizers = trained(cfg)                                            # the spine
        hilserl.save_checkpoint(checkpoint_run(cfg, tmp_path, agent, optimizers))
        resumed = make_agent(cfg, seed=1)
        resumed_optimizers = hilserl.make_optimizers(resumed, cfg)
        hilserl.load_checkpoint(tmp_path, resumed, resumed_optimizers)
        torch._dynamo.reset()   # fast.py from there, compiling the graphs of test_fast_learner_...: Inductor's
        with torch._inductor.config.patch(fallback_random=True):    # cache has them (a minute saved in CI)
            learner = fast.Learner(resumed, resumed_optimizers, cfg, stacked(random_batch(), 2))
        assert_same_training_state(agent, optimizers, resumed, resumed_optimizers)
        learner(stacked(random_batch(seed=1), 2))
        hilserl.save_checkpoint(checkpoint_run(cfg, tmp_path, resumed, resumed_optimizers))
        back = make_agent(cfg, seed=2)
        back_optimizers = hilserl.make_optimizers(back, cfg)
        hilserl.load_checkpoint(tmp_path, back, back_optimizers)                    # and the spine again
        assert_same_training_state(resumed, resumed_optimizers, back, back_optimizers)
        assert [adam_steps(back_optimizers[k]) for k in ("critic", "actor", "temperature")] == [{4}, {2}, {2}]
        hilserl.learn(back, back_optimizers, cfg, stacked(random_batch(seed=2), 2))
        assert adam_steps(back_optimizers["critic"]) == {6}

    def test_a_checkpoint_of_the_older_written_out_adam_evaluates_and_refuses_to_resume_in_one_line(self, tmp_path):
        cfg = small_cfg()
        agent, optimizers = trained(cfg)
        states = {k: [o.state[p] for p in o.param_groups[0]["params"]] for k, o in optimizers.items()}
        old = {k: {"m": [s["exp_avg"] for s in v], "v": [s["exp_avg_sq"] for s in v], "t": v[0]["step"]} for k, v in states.items()}
        torch.save({"agent": agent.state_dict(), "opts": old, "progress": {"episode": 3}}, tmp_path / "checkpoint.pt")
        with pytest.raises(SystemExit, match=r"the critic optimizer's state does not fit this agent \(KeyError\('optimizers'\)\); "
                                             r"evaluate it \(--eval .*\) or start a new run$"):
            hilserl.load_checkpoint(tmp_path, make_agent(cfg, seed=1), hilserl.make_optimizers(make_agent(cfg), cfg))
        fresh = make_agent(cfg, seed=1)
        assert hilserl.load_checkpoint(tmp_path, fresh) == {"episode": 3}
        assert all(torch.equal(p, q) for p, q in zip(agent.state_dict().values(), fresh.state_dict().values()))

    def test_a_checkpoint_whose_optimizer_does_not_fit_is_a_one_line_error(self, tmp_path):
        cfg = small_cfg()
        agent = make_agent(cfg)
        other = {"critic": torch.optim.Adam(list(agent.critic_params.values())[:3]).state_dict()}
        torch.save({"agent": agent.state_dict(), "optimizers": other, "progress": {}}, tmp_path / "checkpoint.pt")
        with pytest.raises(SystemExit, match="the critic optimizer's state does not fit this agent"):
            hilserl.load_checkpoint(tmp_path, make_agent(cfg), {"critic": hilserl.make_optimizers(agent, cfg)["critic"]})
        assert hilserl.load_checkpoint(tmp_path, make_agent(cfg)) == {}   # evaluating needs the agent only


    def test_ten_kill_9s_at_random_moments_lose_at_most_the_episode_in_progress(self, tmp_path):
        import subprocess
        run, out = tmp_path / "run", tmp_path / "out.txt"
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1",
                 "--training_starts", "10", "--episode_steps", "20", "--checkpoint_every", "3", "--demo_episodes", "2",
                 "--demo_keep_failed", "true"]
        def start(*args):
            return subprocess.Popen([sys.executable, "hilserl.py", *args, *small], stdout=open(out, "w"),
                                    stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(__file__)))
        def episodes_on_disk():
            return [int(p.stem.split("_")[1]) for p in sorted(run.glob("episodes/episode_*.npz"))]
        rng = np.random.default_rng(0)
        process = start("--demos", str(tmp_path / "demos.npz"), "--run_dir", str(run))
        while not (run / "config.json").exists():                                      # from here on it can resume
            assert process.poll() is None, out.read_text()
            time.sleep(0.05)
        for kill in range(10):
            if kill:
                process = start("--resume", str(run))
            time.sleep(rng.uniform(0.0, 5.0))                                          # start-up, episodes, saves
            process.send_signal(signal.SIGKILL)
            process.wait()
            printed = [int(m) for m in re.findall(r"^episode +(\d+) .* updates/s$", out.read_text(), re.M)]   # training's
            on_disk = episodes_on_disk()
            assert on_disk == list(range(1, len(on_disk) + 1))                         # no gap, no episode twice
            assert not printed or printed[-1] <= len(on_disk) <= printed[-1] + 1       # only the one in progress is lost
        process = start("--resume", str(run), "--max_env_steps", str(20 * len(episodes_on_disk()) + 50))
        assert process.wait() == 0, out.read_text()
        rows = list(csv.DictReader(open(run / "log.csv")))
        assert [int(r["episode"]) for r in rows] == episodes_on_disk() == list(range(1, len(rows) + 1))
        assert [int(r["env_steps"]) for r in rows] == list(np.cumsum([int(r["length"]) for r in rows]))

    def test_an_existing_run_folder_is_refused_before_anything_is_written(self, tmp_path, monkeypatch):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "log.csv").write_text("episode\n1\n")
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--run_dir", str(tmp_path / "run"), "--demos", str(tmp_path / "d.npz")])
        with pytest.raises(SystemExit, match="already holds a run; continue it with --resume .*run or pick another --run_dir"):
            hilserl.main()
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["log.csv", "run"]     # no demos recorded, nothing written

    def test_a_resume_that_does_not_fit_is_one_line_and_changes_nothing(self, tmp_path, monkeypatch):
        cfg = Config(hidden_dim=32, state_latent_dim=16)
        torch.save({"agent": Agent(12, cfg).state_dict(), "optimizers": {}, "progress": {}}, tmp_path / "checkpoint.pt")
        (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--resume", str(tmp_path), "--hidden_dim", "64"])
        with pytest.raises(SystemExit, match="checkpoint.pt does not fit the network these settings make .*size mismatch"):
            hilserl.main()
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    def test_a_truncated_or_foreign_checkpoint_is_one_line_that_never_advises_unpickling(self, tmp_path):
        cfg = small_cfg()
        agent, optimizers = trained(cfg)
        hilserl.save_checkpoint(checkpoint_run(cfg, tmp_path, agent, optimizers))
        data = (tmp_path / "checkpoint.pt").read_bytes()
        (tmp_path / "checkpoint.pt").write_bytes(data[:len(data) // 2])
        with pytest.raises(SystemExit, match="checkpoint.pt: not a readable checkpoint") as error:
            hilserl.load_checkpoint(tmp_path, make_agent(cfg))
        torch.save({"agent": agent.state_dict(), "code": Config()}, tmp_path / "checkpoint.pt")   # an object to unpickle
        with pytest.raises(SystemExit, match="checkpoint.pt: not a readable checkpoint") as foreign:
            hilserl.load_checkpoint(tmp_path, make_agent(cfg))
        assert "weights_only" not in str(error.value) + str(foreign.value)

    def test_plot_without_run_folders_is_one_line(self, tmp_path, monkeypatch):
        for value in ("nowhere,out.png", "out.png"):
            monkeypatch.setattr("sys.argv", ["hilserl.py", "--plot", value])
            with pytest.raises(SystemExit, match="takes run folders with a log.csv, then the PNG to write"):
                hilserl.main()

    def test_a_classifier_keeps_its_own_sizes_and_refuses_other_frames(self, tmp_path):
        cfg = Config(classifier=str(tmp_path / "c.pt"), use_images=True, image_size=32, hidden_dim=16, image_latent_dim=8)
        trained = classifier.RewardClassifier({"front": (32, 32, 3)}, cfg)
        torch.save({"image_shapes": {"front": (32, 32, 3)}, "hidden_dim": 16, "image_latent_dim": 8,
                    "classifier": trained.state_dict()}, cfg.classifier)
        loaded = classifier.load_classifier(dataclasses.replace(cfg, hidden_dim=256, image_latent_dim=256), "cpu")
        assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), trained.state_dict().values()))
        with pytest.raises(ValueError, match=r"trained on frames \{'front': \(32, 32, 3\)\}, these settings make"):
            classifier.load_classifier(dataclasses.replace(cfg, image_size=64), "cpu")
        with pytest.raises(ValueError, match="not a classifier that python classifier.py wrote"):
            classifier.load_classifier(dataclasses.replace(cfg, classifier=str(tmp_path / "missing.pt")), "cpu")

    def test_a_config_json_with_a_setting_of_the_wrong_type_is_one_line(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps({"hidden_dim": 16.5}))
        with pytest.raises(SystemExit, match="config.json: missing or not a config.json that hilserl.py wrote"):
            config.load_run_config(["--resume", str(tmp_path)])

    def test_a_classifier_without_camera_frames_is_one_line(self):
        with pytest.raises(ValueError, match="--classifier c.pt judges camera frames; add --use_images true"):
            classifier.load_classifier(Config(classifier="c.pt"), torch.device("cpu"))


# =================================================================================================
# TestConfig: config.py: typed overrides, one-line errors, the lessons' warnings and diagnosis.
# =================================================================================================


class TestConfig:
    """config.py: typed overrides, one-line errors, the lessons' warnings and diagnosis."""

    def test_overrides_are_typed(self):
        cfg, words = config.parse_overrides(["calibrate", "--utd_ratio", "10", "--discount=0.9", "--compile"])
        assert (cfg.utd_ratio, cfg.discount, cfg.compile, words) == (10, 0.9, True, ["calibrate"])

    @pytest.mark.parametrize("args, message", [
        (["--utd_ratoi", "3"], "unknown option --utd_ratoi"),
        (["--utd_ratio", "ten"], "--utd_ratio expects int, got 'ten'"),
        (["--discount"], "--discount needs a value"),
        (["--eval", ""], "--eval needs a run folder (runs/...), got ''"),
        (["--resume=", "--seed", "1"], "--resume needs a run folder"),
        (["--utd_ratio", "0"], "--utd_ratio 0: must be >= 1"),
        (["--batch_size", "0"], "--batch_size 0: must be >= 2"),
        (["--batch_size", "7"], "--batch_size 7: must be even"),
        (["--control_hz", "0"], "--control_hz 0.0: must be > 0"),
        (["--episode_steps", "-1"], "--episode_steps -1: must be >= 1"),
        (["--max_joint_step_rad", "-0.1"], "--max_joint_step_rad -0.1: must be > 0"),
        (["--lr", "nan"], "--lr nan: must be a finite number"),
        (["--discount", "1.5"], "--discount 1.5: must be >= 0 and <= 1"),
        (["--workspace_m", "0.3,0.15,-0.1,0.1,0.0,0.1"], "--workspace_m '0.3,0.15,-0.1,0.1,0.0,0.1': must be x0,x1,y0,y1,z0,z1"),
        (["--workspace_m", "0.1,0.2"], "each low below its high"),
        (["--cube_area_m", "a,b,c,d"], "--cube_area_m 'a,b,c,d': must be x0,x1,y0,y1"),
        (["--teleop", "spacemouse"], "--teleop 'spacemouse': must be one of auto, gamepad, leader, expert"),
        (["--actor_std_min", "6"], "--actor_std_min 6.0: must be at most --actor_std_max 5.0"),
    ])
    def test_bad_options_are_one_line_errors(self, args, message, capsys):
        with pytest.raises(SystemExit) as exit_info:
            config.load_config(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1

    def test_a_device_that_is_not_there_is_one_line(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        for device in ("cuda", "tpu"):
            with pytest.raises(SystemExit, match=f"--device '{device}': not here; use auto, cpu, cuda or mps"):
                networks.pick_device(config.load_run_config(["--device", device]))
        with pytest.raises(SystemExit, match=r"^error: --device mps: mps is not available here \(it needs Apple"):
            networks.pick_device(config.load_run_config(["--device", "mps"]))
        assert networks.pick_device(config.load_run_config(["--device", "cpu"])).type == "cpu"

    @pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
    def test_auto_picks_cuda_then_apples_mps_then_the_cpu(self, cuda, mps, picked, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert networks.pick_device(config.load_run_config([])).type == picked
        if mps:
            assert networks.pick_device(config.load_run_config(["--device", "mps"])).type == "mps"

    @pytest.mark.parametrize("kind", ["cpu", "mps"])
    def test_what_a_device_cannot_do_falls_back_to_the_eager_update_and_plain_adam(self, kind, monkeypatch, capsys):
        """On the CPU, as if it were a device with neither fused Adam nor --compile (mps has no compile)."""
        monkeypatch.setitem(networks.DEVICE_CAN, "cpu", set() if kind == "mps" else networks.DEVICE_CAN["cpu"])
        cfg = small_cfg(utd_ratio=2)
        agent = make_agent(cfg)
        optimizers = hilserl.make_optimizers(agent, cfg)
        assert all(o.defaults["fused"] == (kind == "cpu") for o in optimizers.values())
        if kind == "mps":                       # compiling on the CPU takes a minute: only the fallback is run
            twin = copy.deepcopy(agent)
            twin_optimizers = hilserl.make_optimizers(twin, cfg)
            batches = stacked(random_batch(), 2)
            learner = fast.Learner(agent, optimizers, cfg, batches)
            assert capsys.readouterr().out == "--compile: not measured on cpu; the eager update runs\n"
            torch.manual_seed(0)
            stats = learner(batches)
            torch.manual_seed(0)
            expected = hilserl.learn(twin, twin_optimizers, cfg, batches)
            assert all(torch.equal(stats[k], expected[k]) for k in expected)

    @pytest.mark.parametrize("args, message", [
        (["train"], "unexpected 'train': hilserl.py takes only --setting value options"),
        (["-utd_ratio", "3"], "unexpected '-utd_ratio'"),
        (["--resume", "nowhere"], "nowhere/config.json: missing or not a config.json that hilserl.py wrote"),
        (["--eval", "CORRUPT"], "config.json: missing or not a config.json that hilserl.py wrote"),
    ])
    def test_hilserl_refuses_words_and_unreadable_run_folders_in_one_line(self, args, message, tmp_path, monkeypatch):
        (tmp_path / "config.json").write_text('{"utd_ratio": 20, "hidden_')            # cut off mid-write
        monkeypatch.setattr("sys.argv", ["hilserl.py", *[str(tmp_path) if a == "CORRUPT" else a for a in args]])
        with pytest.raises(SystemExit, match=re.escape(message)):
            hilserl.main()

    def test_lessons_warnings(self):
        assert config.warnings_for(config.Config(), num_demo_episodes=20) == []
        bad = config.Config(temperature_init=0.2, utd_ratio=2, reward_step=0.0, reward_success=1.0)
        lines = config.warnings_for(bad, num_demo_episodes=15)
        assert len(lines) == 5 and all("\n" not in line for line in lines)

# =================================================================================================
# TestRobot: robot.py: packets, the bus against the emulator, calibration, safety, FK/IK, cameras, env.
# =================================================================================================


def make_bus(emulator=None, retries=2):
    emulator = emulator or ServoEmulator()
    # a real turnaround allowance: with none, a reply times out whenever the test is descheduled
    return emulator, FeetechBus(emulator, 1_000_000, retries=retries, latency_s=0.02)


def make_arm(max_step_rad=0.1):
    emulator, bus = make_bus()
    arm = robot.SO101(bus, robot.chain_calibration(), max_step_rad)
    arm.connect()
    arm.configure()
    return emulator, arm


def instructions(emulator, code):
    return [p for p in emulator.received if p[4] == code]


LEROBOT_JSON = {  # a follower calibration file as LeRobot writes it
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1470, "range_min": 758, "range_max": 3292},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": 157, "range_min": 815, "range_max": 3238},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": -1276, "range_min": 856, "range_max": 3094},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": -1299, "range_min": 843, "range_max": 3229},
    "wrist_roll": {"id": 5, "drive_mode": 0, "homing_offset": -1997, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": 1232, "range_min": 2039, "range_max": 3475},
}


def write_clip(path, frames=30):
    """A 64x48 MJPG video that OpenCV opens as a camera; returns its path as a string."""
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(frames):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    return str(path)


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


class TestRobot:
    """robot.py: packets, the bus against the emulator, calibration, safety, FK/IK, cameras, env."""

    # --- packets and sign encodings -------------------------------------------------------------------
    def test_instruction_packet_matches_feetech_example(self):
        # READ 2 bytes at 0x38 from servo 3: the example in Feetech's documentation.
        assert robot.packet(3, robot.READ, [0x38, 2]) == bytes.fromhex("ffff0304023802bc")

    @pytest.mark.parametrize("value, sign_bit, encoded", [
        (-100, 11, 0x0864), (-2047, 11, 0x0FFF), (-300, 15, 0x812C), (-1, 15, 0x8001), (-50, 10, 0x0432),
        (1234, 15, 1234), (0, 11, 0)])
    def test_sign_magnitude_encoding(self, value, sign_bit, encoded):
        assert robot.encode_sign(value, sign_bit) == encoded
        assert robot.decode_sign(encoded, sign_bit) == value

    def test_homing_offset_beyond_eleven_bits_is_refused(self):
        with pytest.raises(AssertionError):
            robot.encode_sign(-2048, 11)

    @pytest.mark.parametrize("name, value, wire", [
        ("Homing_Offset", -100, "6408"), ("Goal_Position", -300, "2c81"), ("Present_Velocity", -1, "0180"),
        ("Present_Load", -50, "3204"), ("Present_Current", -7, "0780"), ("Model_Number", 777, "0903")])
    def test_every_signed_register_round_trips_through_the_emulator(self, name, value, wire):
        emulator, bus = make_bus()
        bus.write(2, name, value)
        address, size, _ = robot.REGISTERS[name]
        assert emulator.tables[2][address:address + size].hex() == wire  # little-endian, sign bit set
        assert bus.read(2, name) == value
        assert emulator.get(2, name) == value

    # --- every instruction, byte for byte -------------------------------------------------------------
    def test_ping_reply_is_byte_exact(self):
        emulator = ServoEmulator()
        emulator.write(robot.packet(1, robot.PING))
        assert emulator.read(100) == bytes.fromhex("ffff010200fc")  # ~(1 + 2 + 0) = 0xfc
        _, bus = make_bus(emulator)
        bus.ping(1)

    def test_read_model_number_is_777(self):
        emulator = ServoEmulator()
        emulator.write(robot.packet(4, robot.READ, [3, 2]))
        assert emulator.read(100) == bytes([0xFF, 0xFF, 4, 4, 0, 0x09, 0x03, ~(4 + 4 + 9 + 3) & 0xFF])
        assert make_bus(emulator)[1].read(4, "Model_Number") == 777

    def test_write_gets_an_empty_status_and_changes_the_table(self):
        emulator = ServoEmulator()
        emulator.write(robot.packet(5, robot.WRITE, [21, 16]))
        assert emulator.read(100) == bytes([0xFF, 0xFF, 5, 2, 0, ~(5 + 2) & 0xFF])
        assert emulator.get(5, "P_Coefficient") == 16

    def test_sync_read_replies_come_back_to_back_in_list_order(self):
        emulator = ServoEmulator()
        for servo_id in IDS:
            emulator.set(servo_id, "Present_Position", 1000 + servo_id)
        emulator.write(robot.packet(0xFE, robot.SYNC_READ, [56, 2, 3, 1, 2]))
        expected = b"".join(robot.packet(i, 0, (1000 + i).to_bytes(2, "little")) for i in (3, 1, 2))
        assert emulator.read(1000) == expected
        assert make_bus(emulator)[1].sync_read("Present_Position", [6, 5, 4]) == [1006, 1005, 1004]

    def test_sync_write_sets_every_servo_and_gets_no_reply(self):
        emulator, bus = make_bus()
        bus.sync_write("Goal_Position", {1: 100, 2: -200, 6: 3000})
        [sent] = instructions(emulator, robot.SYNC_WRITE)
        assert sent[3] == 3 * (1 + 2) + 4  # LEN = N (1 + size) + 4
        assert [emulator.get(i, "Goal_Position") for i in (1, 2, 6)] == [100, -200, 3000]
        assert emulator.read(100) == b""                                # broadcast: no servo replies

    def test_timeout_scales_with_the_bytes_expected_at_the_baud_rate(self):
        emulator = ServoEmulator()
        FeetechBus(emulator, 57_600, latency_s=0.0).read(1, "Present_Position")
        wire_s = (8 + 8) * 10 / 57_600  # READ request and its 2-byte reply, 10 bits a byte
        assert 0.8 * wire_s < emulator.timeout <= wire_s

    # --- faults: retries, then an error that names the servo ------------------------------------------
    @pytest.mark.parametrize("fault", ["drop", "bad_checksum", "truncate"])
    def test_one_bad_reply_is_retried_once(self, fault):
        emulator, bus = make_bus()
        emulator.set(3, "Present_Position", 1234)
        emulator.inject(3, fault)
        assert bus.read(3, "Present_Position") == 1234
        assert len(emulator.received) == 2

    def test_garbage_byte_before_the_header_is_skipped_without_a_retry(self):
        emulator, bus = make_bus()
        emulator.set(3, "Present_Position", 1234)
        emulator.inject(3, "garbage")
        assert bus.read(3, "Present_Position") == 1234
        assert len(emulator.received) == 1

    @pytest.mark.parametrize("fault, problem", [
        ("drop", "did not answer"), ("bad_checksum", "bad checksum"), ("truncate", "truncated reply")])
    def test_persistent_fault_raises_after_the_retries_naming_servo_and_joint(self, fault, problem):
        emulator, bus = make_bus(retries=2)
        emulator.inject(3, fault, times=3)
        with pytest.raises(robot.BusError) as error:
            bus.read(3, "Present_Position")
        assert len(emulator.received) == 3
        message = str(error.value)
        for part in ("servo 3 (elbow_flex)", problem, "READ Present_Position", "after 3 tries", "power", "cable",
                     "id is 3", "1000000 baud"):
            assert part in message

    def test_a_late_reply_never_answers_a_later_request(self):
        emulator, bus = make_bus(retries=1)
        emulator.set(3, "Present_Position", 1234)
        emulator.set(3, "Present_Load", 77)
        emulator.inject(3, "late", times=2)             # both tries: each reply comes 30 ms after its request
        with pytest.raises(robot.BusError, match="did not answer"):
            bus.read(3, "Present_Position")
        assert bus.read(3, "Present_Load") == 77         # not the late 1234
        emulator.inject(3, "late")                      # one late try, then the retry answers, once
        assert bus.read(3, "Present_Position") == 1234 and bus.read(3, "Present_Load") == 77

    def test_soak_with_five_percent_faults_returns_no_wrong_value(self):
        emulator, bus = make_bus(retries=2)
        rng = np.random.default_rng(0)
        wrong = failed = 0
        for n in range(300):
            servo_id, value = int(rng.integers(1, 7)), int(rng.integers(0, 4096))
            emulator.set(servo_id, "Present_Position", value)
            if rng.random() < 0.05:
                emulator.inject(servo_id, str(rng.choice(robot.FAULTS)))
            try:
                wrong += bus.read(servo_id, "Present_Position") != value
            except robot.BusError:
                failed += 1
        assert wrong == 0 and failed == 0

    def test_sync_read_retries_when_one_servo_drops_its_reply(self):
        emulator, bus = make_bus()
        emulator.inject(5, "drop")
        assert bus.sync_read("Present_Position", IDS) == [2048] * 6
        assert len(instructions(emulator, robot.SYNC_READ)) == 2

    def test_error_bit_raises_by_name_without_retrying(self):
        emulator, bus = make_bus()
        emulator.set(6, "Status", 0x20 | 0x01)  # latched overload and input voltage
        with pytest.raises(robot.ServoError, match=r"servo 6 \(gripper\) reports input voltage, overload"):
            bus.read(6, "Present_Position")
        assert len(emulator.received) == 1

    def test_servo_that_never_answers_fails_connect_naming_it(self):
        emulator, bus = make_bus(ServoEmulator(ids=(1, 2, 3, 4, 5)))
        with pytest.raises(robot.BusError, match=r"gripper \(id 6\) does not answer"):
            robot.SO101(bus, None).connect()

    def test_wrong_model_fails_connect(self):
        emulator, bus = make_bus()
        emulator.set(2, "Model_Number", 2825)
        with pytest.raises(robot.BusError, match="shoulder_lift .* model 2825"):
            robot.SO101(bus, None).connect()

    # --- configuration, calibration -------------------------------------------------------------------
    def test_configure_writes_the_follower_settings(self):
        emulator, bus = make_bus()
        emulator.set(1, "Phase", 12 | 0x10)
        robot.SO101(bus, robot.chain_calibration()).configure()
        assert emulator.get(1, "Phase") == 12  # multi-turn bit cleared
        assert all(emulator.get(i, "P_Coefficient") == 16 for i in IDS)
        assert [emulator.get(6, r) for r in ("Max_Torque_Limit", "Protection_Current", "Overload_Torque")] == [500, 250, 25]
        assert emulator.get(1, "Max_Torque_Limit") == 1000
        assert emulator.get(3, "Max_Position_Limit") == robot.chain_calibration()["elbow_flex"].range_max

    def test_lerobot_calibration_loads_and_round_trips(self, tmp_path):
        path = tmp_path / "lerobot.json"
        path.write_text(json.dumps(LEROBOT_JSON))
        calibration = robot.load_calibration(path)
        assert calibration["shoulder_pan"] == robot.JointCalibration(1, 0, -1470, 758, 3292)
        robot.save_calibration(tmp_path / "ours.json", calibration)
        assert json.loads((tmp_path / "ours.json").read_text()) == LEROBOT_JSON
        assert robot.load_calibration(tmp_path / "ours.json") == calibration

    def test_bad_calibration_names_the_joint_and_the_fix(self, tmp_path):
        data = json.loads(json.dumps(LEROBOT_JSON))
        data["gripper"]["range_min"] = 3600
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(SystemExit, match="joint 'gripper' .* min 3600, max 3475.* recalibrate with python robot.py"):
            robot.load_calibration(tmp_path / "bad.json")

    @pytest.mark.parametrize("spoil", ["drop joint", "drop field", "null field"])
    def test_a_calibration_with_a_missing_or_null_field_is_one_line(self, tmp_path, spoil):
        data = json.loads(json.dumps(LEROBOT_JSON))
        if spoil == "drop joint":
            del data["elbow_flex"]
        elif spoil == "drop field":
            del data["elbow_flex"]["range_max"]
        else:
            data["elbow_flex"]["range_max"] = None
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(SystemExit, match="joint 'elbow_flex': field .* missing or not a number - recalibrate with"):
            robot.load_calibration(tmp_path / "bad.json")

    def test_a_bad_calibration_stops_a_real_arm_run_in_one_line(self, tmp_path, monkeypatch):
        controller, device = os.openpty()                                             # a serial port that opens
        (tmp_path / "cut.json").write_text('{"shoulder_pan": {"id": 1,')
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--port", os.ttyname(device), "--calibration",
                                         str(tmp_path / "cut.json"), "--demos", __file__, "--run_dir", str(tmp_path / "r")])
        try:
            with pytest.raises(SystemExit, match=r"^error: calibration .*cut.json: no such file or not JSON - recalibrate"):
                hilserl.main()
        finally:
            os.close(controller), os.close(device)

    def test_guided_calibration_records_offsets_and_ranges(self, tmp_path):
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

    def test_calibrate_writes_nothing_before_the_first_answer_and_restores_the_servos_when_it_fails(self):
        emulator, bus = make_bus()
        arm = robot.SO101(bus, None)
        for servo_id in IDS:
            emulator.set(servo_id, "Homing_Offset", 30 + servo_id)                    # an earlier calibration's
            emulator.set(servo_id, "Max_Position_Limit", 3000 + servo_id)
        registers = lambda: [emulator.get(i, r) for i in IDS for r in ("Homing_Offset", "Min_Position_Limit",  # noqa: E731
                                                                       "Max_Position_Limit")]
        before, written = registers(), len(emulator.received)
        def no_answer(prompt):                                                        # stdin closed: EOF
            raise EOFError
        with pytest.raises(robot.RobotError, match=r"^no answer at the prompt; nothing changed$"):
            robot.calibrate(arm, ask=no_answer)
        assert {p[4] for p in emulator.received[written:]} == {robot.READ}           # read, never written
        answers = iter([None])                                                        # centred, then EOF at the sweep
        with pytest.raises(robot.RobotError, match="did not move"):
            robot.calibrate(arm, ask=lambda prompt: next(answers) if "middle" in prompt else no_answer(prompt))
        assert registers() == before                                                  # offsets and limits as they were

    def test_ticks_and_radians_convert_both_ways(self):
        calibration = robot.chain_calibration()
        joints = np.array([0.3, -0.5, 1.0, -1.2, 2.0, 0.25])
        ticks = robot.joints_to_ticks(joints, calibration)
        assert ticks[0] == round(2048 + 0.3 * 4096 / (2 * math.pi))
        assert np.allclose(robot.ticks_to_joints(ticks, calibration), joints, atol=2 * math.pi / 4096)

    # --- safety ---------------------------------------------------------------------------------------
    def test_goal_beyond_a_joint_limit_is_clipped_on_the_wire(self):
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

    def test_goal_jump_is_limited_per_step(self):
        emulator, arm = make_arm(max_step_rad=0.1)
        joints = arm.read_joints()
        joints[0] += 1.0
        arm.write_joints(joints)
        assert emulator.get(1, "Goal_Position") == 2048 + int(0.1 * 4096 / (2 * math.pi))

    def test_exception_inside_the_loop_turns_torque_off(self):
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

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])   # SIGHUP: a closed terminal, a dropped SSH
    def test_sigterm_or_sighup_inside_the_loop_turns_torque_off(self, sig):
        emulator, arm = make_arm()
        arm.torque(True)
        with pytest.raises(SystemExit):
            with arm:
                os.kill(os.getpid(), sig)
                time.sleep(1)
        assert all(emulator.get(i, "Torque_Enable") == 0 for i in IDS)
        assert signal.getsignal(sig) is not robot._exit_on_signal

    def test_an_arm_outside_its_range_gets_goals_inside_it(self):
        emulator, arm = make_arm()
        c = arm.calibration["elbow_flex"]
        emulator.set(3, "Present_Position", c.range_max + 200)                      # started beyond its limit
        arm.read_ticks()
        goal = arm.safe_goal(robot.joints_to_ticks(np.zeros(6), arm.calibration) + [0, 0, 400, 0, 0, 0])
        assert goal[2] == c.range_max                                                 # the limit, not beyond

    def test_a_goal_that_is_not_finite_is_refused_and_nothing_is_sent(self):
        emulator, arm = make_arm()
        sent = len(emulator.received)
        for bad in (np.nan, np.inf):
            with pytest.raises(robot.RobotError, match="is not finite: nothing sent"):
                arm.write_joints(np.array([0.0, bad, 0.0, 0.0, 0.0, 0.5]))
        assert len(emulator.received) == sent

    # --- kinematics -----------------------------------------------------------------------------------
    def test_forward_kinematics_at_zero_matches_the_model(self):
        pos, rot = robot.forward_kinematics(np.zeros(5))
        assert np.allclose(pos, [0.3914, 0.0, 0.2265], atol=5e-4)
        assert np.allclose(rot @ rot.T, np.eye(3))

    def test_home_pose_points_down_in_the_workspace(self):
        pos, rot = robot.forward_kinematics(robot.HOME_RAD)
        low, high = robot.parse_workspace(Config().workspace_m)
        assert np.all(low <= pos) and np.all(pos <= high)
        assert rot[:, 0] @ [0, 0, -1] > 0.999

    def test_ik_of_fk_reaches_random_reachable_targets_within_1mm(self):
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

    def test_ik_keeps_the_gripper_pointing_down_inside_the_workspace(self):
        low, high = robot.parse_workspace(Config().workspace_m)
        for target in np.random.default_rng(1).uniform(low, high, size=(20, 3)):
            q = robot.inverse_kinematics(robot.HOME_RAD, target)
            pos, rot = robot.forward_kinematics(q)
            assert np.linalg.norm(pos - target) < 1e-3
            assert rot[:, 0] @ [0, 0, -1] > math.cos(math.radians(25))

    def test_unreachable_target_ends_within_limits_and_stays_put(self):
        target = np.array([0.8, 0.3, 0.6])  # twice the arm's reach
        q1 = robot.inverse_kinematics(robot.HOME_RAD, target)
        q2 = robot.inverse_kinematics(q1, target)
        assert np.all(np.isfinite(q1)) and np.all(q1 >= robot.ARM_LOW_RAD) and np.all(q1 <= robot.ARM_HIGH_RAD)
        assert np.abs(q2 - q1).max() < 1e-2  # stable: asking again does not move it
        start_distance = np.linalg.norm(robot.forward_kinematics(robot.HOME_RAD)[0] - target)
        assert np.linalg.norm(robot.forward_kinematics(q1)[0] - target) < start_distance - 0.1

    # --- the env --------------------------------------------------------------------------------------
    def test_reset_moves_home_in_small_steps_and_returns_the_first_obs(self):
        emulator, env = make_env()
        obs = env.reset()
        goals = [p for p in instructions(emulator, robot.SYNC_WRITE) if p[5] == 42]
        assert len(goals) > 10  # from the straight arm to home, 0.1 rad per step at most
        assert np.allclose(obs["state"][:5], robot.HOME_RAD, atol=2e-3)
        assert obs["state"][5] == pytest.approx(1.0)  # gripper open
        assert np.allclose(obs["state"][6:9], 0.0)  # EE relative to the episode start
        assert obs["state"].dtype == np.float32 and obs["state"].shape == (9,)

    def test_step_moves_the_ee_by_the_scaled_delta_and_clips_to_the_workspace(self):
        emulator, env = make_env()
        env.reset()
        obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
        assert np.allclose(obs["state"][6:9], [0.01, 0.0, 0.0], atol=1.5e-3)
        for _ in range(30):
            obs, *_ = env.step(np.array([0.0, 0.0, -1.0, 0.0], np.float32))
        ee_z = robot.forward_kinematics(obs["state"][:5])[0][2]
        assert ee_z == pytest.approx(robot.parse_workspace(env.cfg.workspace_m)[0][2], abs=2e-3)

    def test_reward_truncation_and_grasp_penalty(self):
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

    def test_real_world_tick_keeps_the_rate_and_reports_overruns(self):
        world = robot.RealWorld(Config(control_hz=50.0))
        start = time.perf_counter()
        assert world.tick() == 0.0
        assert world.tick() == 0.0
        assert time.perf_counter() - start == pytest.approx(0.04, abs=0.015)
        time.sleep(0.05)
        assert world.tick() == pytest.approx(0.03, abs=0.015)

    # --- cameras --------------------------------------------------------------------------------------
    def test_frames_are_cropped_resized_and_rgb(self):
        bgr = np.zeros((48, 64, 3), np.uint8)
        bgr[:, 32:] = (255, 0, 0)  # right half blue in OpenCV's BGR
        rgb = robot.process_frame(bgr, (32, 0, 32, 48), 16)
        assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
        assert (rgb == (0, 0, 255)).all()

    def test_camera_config_parses_indices_paths_and_rois(self):
        assert robot.parse_cameras("front=0,wrist=/dev/video2", "wrist=10:20:300:200") == {
            "front": (0, None), "wrist": ("/dev/video2", (10, 20, 300, 200))}

    def test_camera_that_cannot_open_names_itself(self):
        with pytest.raises(RuntimeError, match="camera 'front' .*cannot be opened"):
            robot.Camera("front", "/nonexistent/video0", 32)

    def test_camera_that_stops_delivering_names_itself(self, tmp_path):
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

    def test_a_camera_region_outside_the_frame_is_refused_when_the_camera_opens(self, tmp_path):
        path = write_clip(tmp_path / "clip.avi")
        robot.Camera("front", path, 16, roi=(0, 0, 64, 48)).close()                # the whole frame fits
        with pytest.raises(robot.RobotError, match=r"--camera_roi front=10:0:64:48 reaches outside its 64x48 frames"):
            robot.Camera("front", path, 16, roi=(10, 0, 64, 48))

    def test_cameras_opened_before_one_that_fails_are_released(self, tmp_path, monkeypatch):
        closed, close = [], robot.Camera.close
        monkeypatch.setattr(robot.Camera, "close", lambda self: closed.append(self.name) or close(self))
        with pytest.raises(robot.RobotError, match="camera 'wrist'"):
            robot.make_cameras(Config(cameras=f"front={write_clip(tmp_path / 'clip.avi')},wrist=/nonexistent/video9"))
        assert closed == ["front"]                                                   # no capture thread left behind

    # --- the servo health watchdog --------------------------------------------------------------------
    def test_health_is_one_sync_read_of_temperature_voltage_and_load(self):
        emulator, arm = make_arm()
        emulator.set(2, "Present_Temperature", 41)
        emulator.set(3, "Present_Voltage", 69)
        emulator.set(4, "Present_Load", -500)                                       # sign bit 10: -50 %
        sent = len(emulator.received)
        temperature, voltage, load = arm.health()
        assert len(emulator.received) == sent + 1
        assert temperature[1] == 41 and voltage[2] == pytest.approx(6.9) and load[3] == pytest.approx(0.5)

    @pytest.mark.parametrize("register, value, says", [
        ("Present_Temperature", 66, r"wrist_flex is at 66 C \(--max_temperature_c 65.0\)"),
        ("Present_Voltage", 58, r"wrist_flex's supply sagged to 5.8 V \(--min_voltage_v 6.0\)")])
    def test_a_hot_servo_or_a_sagging_supply_stops_the_run_with_torque_off(self, register, value, says):
        emulator, env = make_env()
        with pytest.raises(robot.RobotError, match="servo health: " + says + ": stopping with torque off"):
            with env:
                env.reset()
                env.step(np.zeros(4, np.float32))
                emulator.set(4, register, value)
                env.step(np.zeros(4, np.float32))
        assert all(emulator.get(i, "Torque_Enable") == 0 for i in IDS)

    def test_an_arm_joint_stalled_at_overload_stops_the_run_after_overload_s_and_the_gripper_never_does(self):
        emulator, env = make_env(overload_s=1.5)                                     # 15 steps at 10 Hz
        env.reset()
        emulator.set(6, "Present_Load", 1000)                                        # the gripper squeezing
        for _ in range(20):
            env.step(np.zeros(4, np.float32))
        emulator.set(2, "Present_Load", 850)
        for step in range(20):                                                       # at work: it moves
            env.step(np.array([(-1) ** step, 0, 0, 0], np.float32))
        for _ in range(14):
            env.step(np.zeros(4, np.float32))
        assert env.health["servo/max_load"] == 1.0
        with pytest.raises(robot.RobotError, match="shoulder_lift has been at 85% load without moving for 1.5 s"):
            env.step(np.zeros(4, np.float32))

    # --- command line ---------------------------------------------------------------------------------
    def test_status_only_reads(self, capsys):
        emulator, bus = make_bus()
        emulator.set(4, "Present_Load", -50)
        robot.print_status(bus)
        out = capsys.readouterr().out
        assert "wrist_flex" in out and "-5.0" in out and "7.4" in out
        assert {p[4] for p in emulator.received} == {robot.READ}

    def test_status_shows_torque_and_torque_off_turns_every_servo_off(self, capsys, monkeypatch):
        emulator, bus = make_bus()
        for servo_id in IDS[:3]:
            emulator.set(servo_id, "Torque_Enable", 1)                               # as a killed run leaves it
        monkeypatch.setattr(robot, "open_bus", lambda port, cfg: bus)
        monkeypatch.setattr("sys.argv", ["robot.py", "--port", "/dev/ttyACM0", "status"])
        robot.main()
        rows = capsys.readouterr().out.splitlines()
        assert "torque" in rows[0] and [row.split()[6] for row in rows[1:]] == ["on"] * 3 + ["off"] * 3
        monkeypatch.setattr("sys.argv", ["robot.py", "--port", "/dev/ttyACM0", "torque-off"])
        robot.main()
        assert all(emulator.get(servo_id, "Torque_Enable") == 0 for servo_id in IDS)
        assert [row.split()[6] for row in capsys.readouterr().out.splitlines()[1:]] == ["off"] * 6

    def test_bench_reports_driver_and_wire_time(self, capsys):
        bench.bench_bus(Config(), n=50)
        assert "wire time of the 88 bytes at 1000000 baud 0.880 ms" in capsys.readouterr().out

    def test_bus_over_a_real_serial_port(self):
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

    def test_blocked_arm_is_not_pushed_ever_harder(self):
        emulator, env = make_env()
        env.reset()
        for servo_id in IDS:
            emulator.set(servo_id, "Torque_Enable", 0)  # the servos stop following: as if blocked
        for _ in range(10):
            obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
        ee = robot.forward_kinematics(obs["state"][:5])[0]
        assert env.ee_target[0] - ee[0] == pytest.approx(3 * env.cfg.ee_step_m)  # three steps ahead, no more


# =================================================================================================
# TestSim: sim.py: the simulated SO-101 and the scripted expert.
# =================================================================================================


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


class TestSim:
    """sim.py: the simulated SO-101 and the scripted expert."""

    def test_goal_written_through_the_driver_is_reached_in_mujoco(self):
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

    def test_scripted_expert_succeeds_in_at_least_95_percent_of_50_random_episodes(self):
        cfg = Config()
        arm, cameras, world = make_sim(cfg, seed=1)
        expert = ScriptedExpert(cfg, world, seed=1)
        with SO101Env(cfg, arm, cameras, world) as env:
            successes = sum(run_episode(env, expert, seed)[0]["success"] for seed in range(100, 150))
        assert successes >= 48

    def test_cube_is_lifted_by_the_jaws_and_falls_when_they_open(self):
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

    def test_reset_is_deterministic_under_a_seed(self):
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

    def test_expert_leaves_a_good_policy_alone_and_takes_over_a_stalling_one(self):
        cfg = Config(expert_holds_on=False)
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

    def test_by_default_the_expert_keeps_control_to_the_end_once_it_took_over(self):
        cfg = Config()
        arm, cameras, world = make_sim(cfg, seed=4)
        with SO101Env(cfg, arm, cameras, world) as env:
            stalling_policy = lambda obs: np.zeros(4, np.float32)  # noqa: E731
            info, steps, interventions = run_episode(env, ScriptedExpert(cfg, world, seed=4), 4, stalling_policy)
        assert info["success"] and interventions == steps - cfg.expert_patience   # every step after it took over

    def test_cameras_return_uint8_rgb_frames_of_image_size(self):
        cfg = Config(use_images=True, image_size=64)
        arm, cameras, world = make_sim(cfg, seed=5)
        with SO101Env(cfg, arm, cameras, world) as env:
            obs = env.reset(seed=5)
        for name in ("front", "wrist"):
            assert obs[name].shape == (64, 64, 3) and obs[name].dtype == np.uint8
            assert obs[name].std() > 10  # a scene, not a blank frame


# =================================================================================================
# TestTeleop: teleop.py: gamepad mappings, keys, interventions, leader arm, demo recording.
# =================================================================================================


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


class Scripted:
    """A device that replays (act, held) pairs, standing in for a gamepad."""

    def __init__(self, *steps):
        self.steps = list(steps)

    def read(self, obs):
        return self.steps.pop(0)

    def reset(self):
        pass


HUMAN = np.array([1.0, 0.0, 0.0, 0.0], np.float32)


POLICY = np.array([0.0, 0.0, -1.0, 1.0], np.float32)


def leader_at(tmp_path, joints):
    """A LeaderArm whose servos (an emulator) sit at `joints` (5 rad + gripper opening)."""
    from robot import IDS, ServoEmulator, chain_calibration, joints_to_ticks, save_calibration
    calibration = chain_calibration()
    save_calibration(tmp_path / "leader.json", calibration)
    emulator = ServoEmulator()
    for servo_id, ticks in zip(IDS, joints_to_ticks(joints, calibration)):
        emulator.set(servo_id, "Present_Position", int(ticks))
    return teleop.LeaderArm(Config(leader_calibration=str(tmp_path / "leader.json")), port=emulator), emulator


def record_cfg(**overrides):
    # Short episodes, every one kept, so the number of episodes on disk is known in advance.
    return Config(episode_steps=12, demo_keep_failed=True, **overrides)


def label_cfg(**overrides):
    return Config(episode_steps=40, image_size=32, **overrides)


class TestTeleop:
    """teleop.py: gamepad mappings, keys, interventions, leader arm, demo recording."""

    @pytest.mark.parametrize("layout", [XBOX, PS])
    def test_sticks_move_the_end_effector_in_the_base_frame(self, layout):
        act, held = pad(layout, {"stick_y": -1.0, "stick_x": 1.0, "stick_z": -1.0})
        np.testing.assert_allclose(act, [1.0, -1.0, 1.0, 0.0])   # up = +x, right = -y, right stick up = +z
        assert held == set()

    def test_layouts_read_the_numbers_pygame_documents(self):
        # Xbox 360: right stick vertical is axis 4, RB is button 5; PS4: axis 3 and R1 is button 10.
        axes = [0.0, 0.0, -1.0, 0.0, -1.0, -1.0]
        buttons = [0] * 16
        buttons[5] = 1
        xbox_act, xbox_held = teleop.gamepad_action(axes, buttons, XBOX, 0.1, 1.0)
        assert xbox_act[2] == 1.0 and "intervene" in xbox_held
        ps_act, ps_held = teleop.gamepad_action(axes, buttons, PS, 0.1, 1.0)
        assert ps_act[2] == 0.0 and "intervene" not in ps_held   # PS4 axis 4 is L2 and button 5 is PS

    def test_layout_is_chosen_from_the_pad_name(self):
        assert teleop.gamepad_layout("Xbox 360 Controller") == XBOX
        assert teleop.gamepad_layout("PS4 Controller") == PS
        assert teleop.gamepad_layout("PS5 Controller") == PS
        assert teleop.gamepad_layout("Logitech Gamepad F310") == XBOX
        assert teleop.gamepad_layout("PS4 Controller", layout="xbox") == XBOX

    def test_dead_zone_zeroes_small_deflections_and_rises_without_a_jump(self):
        assert pad(XBOX, {"stick_y": -0.09, "stick_x": 0.05, "stick_z": 0.1})[0][:3].tolist() == [0, 0, 0]
        just_past = pad(XBOX, {"stick_y": -0.11})[0][0]
        assert 0 < just_past < 0.02
        assert pad(XBOX, {"stick_y": -0.55})[0][0] == pytest.approx(0.5)

    def test_speed_scales_the_action(self):
        assert pad(XBOX, {"stick_y": -1.0}, speed=0.3)[0][0] == pytest.approx(0.3)

    def test_triggers_close_and_open_the_gripper(self):
        assert pad(XBOX, {"close": 1.0})[0][3] == -1.0
        assert pad(XBOX, {"open": 1.0})[0][3] == 1.0
        assert pad(XBOX, {"open": 0.2})[0][3] == 0.0            # not past half-way
        assert pad(XBOX, {"close": 1.0, "open": 1.0})[0][3] == 0.0

    @pytest.mark.parametrize("layout", [XBOX, PS])
    @pytest.mark.parametrize("button", ["intervene", "success", "failure", "rerecord", "estop", "quit"])
    def test_each_button_is_reported_held(self, layout, button):
        assert pad(layout, pressed=[button])[1] == {button}

    def test_remap_moves_a_control_and_rejects_unknown_names(self):
        layout = teleop.gamepad_layout("Xbox 360 Controller", remap="intervene=4, success=9")
        assert layout["intervene"] == 4 and layout["success"] == 9 and layout["failure"] == XBOX["failure"]
        with pytest.raises(ValueError, match="gamepad_map"):
            teleop.gamepad_layout("Xbox 360 Controller", remap="jump=3")
        with pytest.raises(SystemExit):                                              # config.py refuses it, one line
            config.load_config(["--gamepad_layout", "nintendo"])

    def test_the_human_acts_only_while_intervene_is_held(self):
        t = teleop.Teleop(Scripted((HUMAN, set()), (HUMAN, {"intervene"}), (HUMAN, {"intervene"}), (HUMAN, set())))
        acting = [t.poll(POLICY, None) for _ in range(4)]
        assert [intervened for _, intervened, _ in acting] == [False, True, True, False]
        for act, intervened, _ in acting:
            np.testing.assert_array_equal(act, HUMAN if intervened else POLICY)

    def test_an_event_fires_once_per_press(self):
        t = teleop.Teleop(Scripted((HUMAN, {"success"}), (HUMAN, {"success"}), (HUMAN, set()), (HUMAN, {"success"})))
        assert [t.poll(POLICY, None)[2] for _ in range(4)] == [{"success"}, set(), set(), {"success"}]

    def test_emergency_stop_turns_the_torque_off_and_stops_the_loop(self):
        calls = []
        t = teleop.Teleop(Scripted((HUMAN, {"intervene", "estop"})), torque_off=lambda: calls.append("off"))
        with pytest.raises(teleop.EmergencyStop):
            t.poll(POLICY, None)
        assert calls == ["off"]

    def test_keys_give_the_buttons_and_no_motion_and_closing_the_window_quits(self, monkeypatch):
        teleop.start_pygame()
        keys = teleop.Keys()
        act, held = keys.read(None)   # nothing is pressed on a dummy display
        np.testing.assert_array_equal(act, np.zeros(4))
        assert held == set()
        pressed = {pygame.K_SPACE, pygame.K_ESCAPE}
        monkeypatch.setattr(pygame.key, "get_pressed", lambda: collections.defaultdict(bool, {k: True for k in pressed}))
        assert keys.read(None)[1] == {"intervene", "estop"}
        pressed.clear()
        pygame.event.post(pygame.event.Event(pygame.QUIT))                           # the window's close button
        assert teleop.Teleop(keys).read(None)[2] == {"quit"}

    def test_the_status_line_counts_the_episode_and_the_recent_rates(self, capsys):
        status = teleop.StatusLine(recent=2)
        for success, human in ((False, (True, False, False, True)), (True, (True,)), (True, (False, False))):
            for h in human:
                status.count(h, -0.05)
            status.end_episode(success)
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("episode    1  steps   4  return   -0.20  success no   intervened  50%  |  last 1: "
                                   "success   0%  intervened  50%")
        assert lines[2].startswith("episode    3  steps   2  return   -0.10  success yes  intervened   0%  |  last 2: "
                                   "success 100%  intervened  50%")

    def test_taking_over_with_the_leader_never_lurches_and_follows_its_motion(self, tmp_path):
        from robot import HOME_RAD, forward_kinematics, inverse_kinematics, joints_to_ticks
        cfg = Config()
        follower = {"state": np.append(HOME_RAD, [1.0, 0, 0, 0]).astype(np.float32)}          # gripper open
        far = HOME_RAD + [0.3, 0.2, -0.2, 0.0, 0.0]
        leader, emulator = leader_at(tmp_path, np.append(far, 0.0))                   # left elsewhere, closed
        act = leader.action(follower, intervening=True)                               # the press
        np.testing.assert_allclose(act[:3], 0.0, atol=1e-6)                           # no jump towards the leader
        assert act[3] == -1.0 and all(emulator.get(i, "Torque_Enable") == 0 for i in IDS)   # close; leader free
        pressed = forward_kinematics(leader.arm.read_joints()[:5])[0]
        q = inverse_kinematics(far, forward_kinematics(far)[0] + [0.004, -0.003, 0.002])   # the hand moves it
        for servo_id, ticks in zip(IDS, joints_to_ticks(np.append(q, 0.0), leader.arm.calibration)):
            emulator.set(servo_id, "Present_Position", int(ticks))
        act = leader.action(follower, intervening=True)
        moved = forward_kinematics(leader.arm.read_joints()[:5])[0] - pressed
        np.testing.assert_allclose(act[:3], moved / cfg.ee_step_m, atol=1e-6)       # the motion, in action units

    def test_the_leader_tracks_the_follower_weakly_while_the_policy_acts(self, tmp_path):
        from robot import HOME_RAD
        follower = {"state": np.append(HOME_RAD, [1.0, 0, 0, 0]).astype(np.float32)}
        leader, emulator = leader_at(tmp_path, np.append(HOME_RAD + [0.3, 0.2, -0.2, 0.0, 0.0], 0.0))
        for _ in range(5):                                                            # 0.1 rad a step at most
            np.testing.assert_array_equal(leader.action(follower, intervening=False), 0.0)
        assert all(emulator.get(i, "Torque_Enable") == 1 and emulator.get(i, "Torque_Limit") == 150 for i in IDS)
        np.testing.assert_allclose(leader.arm.read_joints(), follower["state"][:6], atol=2e-3)

    def test_follower_moves_as_the_leader_moves_while_intervene_is_held(self, tmp_path):
        from robot import HOME_RAD, SO101Env, forward_kinematics, inverse_kinematics, joints_to_ticks
        from sim import make_sim
        cfg = Config()
        leader, emulator = leader_at(tmp_path, np.append(HOME_RAD + [0.3, 0.2, -0.2, 0.0, 0.0], 1.0))
        zero = np.zeros(4, np.float32)
        t = teleop.Teleop(Scripted(*[(zero, set())] * 5, *[(zero, {"intervene"})] * 35), leader)
        env = SO101Env(cfg, *make_sim(cfg, seed=0))
        obs = env.reset()
        for step in range(40):
            if step == 5:                                                             # the press
                pressed = forward_kinematics(obs["state"][:5])[0]
            if step == 12:                                                            # the hand: 3 cm forward
                q = leader.arm.read_joints()
                q[:5] = inverse_kinematics(q[:5], forward_kinematics(q[:5])[0] + [0.03, 0, 0])
                for servo_id, ticks in zip(IDS, joints_to_ticks(q, leader.arm.calibration)):
                    emulator.set(servo_id, "Present_Position", int(ticks))
            act, intervened, _ = t.poll(zero, obs)
            obs = env.step(act)[0]
            if step == 11:                                                            # held where it was
                assert np.linalg.norm(forward_kinematics(obs["state"][:5])[0] - pressed) < 0.006
        np.testing.assert_allclose(forward_kinematics(obs["state"][:5])[0] - pressed, [0.03, 0, 0], atol=0.008)
        env.close()

    def test_record_demos_with_the_expert_keeps_successful_episodes(self, tmp_path):
        from buffer import ReplayBuffer
        cfg = Config()
        path = str(tmp_path / "demos.npz")
        assert teleop.record_demos(cfg, path, episodes=2) == 2
        demos = ReplayBuffer(cfg.demo_capacity, {"state": np.zeros(12, np.float32)}, 4)
        demos.load(path)
        a = demos.arrays
        assert demos.num_episodes == 2 and a["terminated"].sum() == 2 and a["intervened"][a["valid"]].all()
        assert teleop.record_demos(cfg, path, episodes=3) == 3                          # a second run continues

    def test_a_continued_recording_repeats_no_scene_and_a_hopeless_one_gives_up(self, tmp_path):
        from buffer import ReplayBuffer
        cfg, path = Config(), str(tmp_path / "demos.npz")
        teleop.record_demos(cfg, path, episodes=2)
        teleop.record_demos(cfg, path, episodes=4)                                     # as after a kill
        demos = ReplayBuffer(cfg.demo_capacity, {"state": np.zeros(12, np.float32)}, 4)
        demos.load(path)
        a = demos.arrays
        firsts = a["state"][np.flatnonzero(a["valid"] & ~np.roll(a["valid"] & ~(a["terminated"] | a["truncated"]), 1))]
        cubes = {tuple(np.round(s[-3:], 4)) for s in firsts}                           # cube relative to the gripper
        assert demos.num_episodes == 4 and len(cubes) == 4
        with pytest.raises(SystemExit, match=r"3 episodes in a row failed, so recording stopped; .* keeps its 4 episodes"):
            teleop.record_demos(Config(episode_steps=5, demo_max_failures=3), path, episodes=6)

    def test_an_exception_mid_episode_leaves_the_finished_episodes_intact(self, tmp_path, monkeypatch):
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

    def test_labelling_in_the_sim_marks_the_lifted_cube_and_continues_a_file(self, tmp_path):
        path = str(tmp_path / "frames.npz")
        held = teleop.label_frames(label_cfg(), path, success_frames=10)
        with np.load(path) as data:
            success, episode, front = data["success"], data["episode"], data["front"]
        assert held == success.sum() >= 10 and front.shape == (len(success), 32, 32, 3) and front.dtype == np.uint8
        for e in np.unique(episode):                              # the expert lifts the cube within 40 steps
            labels = success[episode == e]
            assert len(labels) == 40 and not labels[:5].any() and labels[-1]   # on the table first, held up at the end
        assert len(np.unique(episode)) == 5                       # one for classifier.py to hold out
        assert teleop.label_frames(label_cfg(), path, success_frames=held + 1) > held   # a second run adds to it
        with np.load(path) as data:
            assert data["episode"].max() > episode.max() and len(data["success"]) > len(success)

    def test_frames_are_positive_while_the_success_button_is_held(self, tmp_path, monkeypatch):
        still = np.zeros(4, np.float32)                          # the cube stays on the table: the physics says no
        presses = [set(), {"success"}, {"success"}, set(), {"success"}, {"failure"},      # episode 1, ended early
                   {"success"}, {"rerecord"},                                             # episode 2, dropped
                   {"success"}, {"quit"}]                                                 # episode 3, then stop
        device = Scripted(*[(still, held) for held in presses])
        monkeypatch.setattr(teleop, "make_teleop", lambda cfg, env: teleop.Teleop(device))
        path = str(tmp_path / "frames.npz")
        assert teleop.label_frames(label_cfg(), path, success_frames=100) == 4
        with np.load(path) as data:
            np.testing.assert_array_equal(data["success"], [False, True, True, False, True, True])
            np.testing.assert_array_equal(data["episode"], [0, 0, 0, 0, 0, 1])

    def test_labelling_gives_up_after_episodes_in_a_row_without_success(self, tmp_path):
        path = str(tmp_path / "frames.npz")
        with pytest.raises(ValueError, match="3 episodes in a row showed no success, so labelling stopped; .*frames.npz "
                                             "keeps its 0 success frames"):
            teleop.label_frames(dataclasses.replace(label_cfg(demo_max_failures=3), episode_steps=3), path, 5)
        assert len(np.load(path)["success"]) == 9                                    # what was labelled is kept

    def test_labelling_into_a_file_of_other_frames_is_a_one_line_error(self, tmp_path):
        path = str(tmp_path / "frames.npz")
        np.savez(path, front=np.zeros((3, 64, 64, 3), np.uint8), wrist=np.zeros((3, 64, 64, 3), np.uint8),
                 success=np.zeros(3, bool), episode=np.zeros(3, int))
        with pytest.raises(ValueError, match="frames.npz: frames of other cameras or another size; label into another"):
            teleop.label_frames(label_cfg(), path, success_frames=1)

    def test_a_killed_recording_leaves_the_finished_episodes_intact(self, tmp_path):
        import signal
        import subprocess
        import sys
        import time
        from buffer import ReplayBuffer
        path = tmp_path / "demos.npz"
        command = [sys.executable, "teleop.py", "record", "--demos", str(path), "--demo_episodes", "1000",
                   "--episode_steps", "12", "--demo_keep_failed", "true"]
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

    def test_make_teleop_picks_the_expert_in_the_sim_and_explains_a_missing_device(self):
        from robot import SO101Env
        from sim import make_sim
        cfg = Config()
        env = SO101Env(cfg, *make_sim(cfg, seed=0))
        assert isinstance(teleop.make_teleop(cfg, env).device, ScriptedExpert)
        with pytest.raises(ValueError, match="no gamepad found"):
            teleop.make_teleop(Config(teleop="gamepad"), env)
        with pytest.raises(ValueError, match="no gamepad found: .* needs a display"):   # headless: no keys either
            teleop.make_teleop(Config(teleop="leader", leader_port="/dev/null"), env)

    def test_the_real_arm_waits_for_a_fresh_intervene_press_then_observes_the_scene_anew(self):
        emulator, env = make_env()
        stale = env.reset()
        still_held = [(HUMAN, {"intervene"})] * 3 + [(HUMAN, set()), (HUMAN, {"intervene"})]
        t = teleop.Teleop(Scripted(*still_held))
        emulator.set(1, "Present_Position", 2100)                                   # the human nudged the arm
        obs = teleop.wait_for_start(t, env, stale)
        assert t.device.steps == [] and obs["state"][0] == pytest.approx(52 / TICKS_PER_RAD) != stale["state"][0]
        assert teleop.wait_for_start(teleop.Teleop(Scripted((HUMAN, set()), (HUMAN, {"quit"}))), env, stale) is None

    def test_evaluating_on_a_real_arm_takes_the_humans_start_success_and_stop(self, tmp_path):
        from robot import RealWorld
        cfg = Config(control_hz=200.0, eval_episodes=3, episode_steps=5)
        emulator, arm = make_arm()
        env = robot.SO101Env(cfg, arm, {}, RealWorld(cfg))
        agent = Agent(9, cfg)
        torch.save({"agent": agent.state_dict(), "progress": {}}, tmp_path / "checkpoint.pt")
        press = [(HUMAN, set()), (HUMAN, {"intervene"})]                            # start an episode
        t = teleop.Teleop(Scripted(*press, (HUMAN, set()), (HUMAN, {"success"}),     # episode 1: success at step 2
                                   *press, *[(HUMAN, set())] * 5,                   # episode 2: runs out
                                   *press, (HUMAN, {"estop"})), torque_off=arm.close)
        with pytest.raises(teleop.EmergencyStop):
            hilserl.evaluate(cfg, env, tmp_path, t)
        assert all(emulator.get(i, "Torque_Enable") == 0 for i in IDS)
        t = teleop.Teleop(Scripted(*press, (HUMAN, set()), (HUMAN, {"success"}), *press, (HUMAN, {"failure"}),
                                   (HUMAN, {"quit"})))
        assert hilserl.evaluate(cfg, env, tmp_path, t) == (0.5, 1.5)                # the third start: quit

    def test_the_loop_learns_between_writing_the_goal_and_the_tick(self, monkeypatch):
        emulator, env = make_env()
        env.reset()
        order = []
        monkeypatch.setattr(env.world, "tick", lambda: order.append(("tick", len(emulator.received))) or 0.0)
        env.step(np.zeros(4, np.float32), lambda: order.append(("learn", len(emulator.received))))
        writes = [i for i, p in enumerate(emulator.received) if p[4] == robot.SYNC_WRITE]
        assert [name for name, _ in order] == ["learn", "tick"] and order[0][1] == writes[-1] + 1

    @pytest.mark.parametrize("button", ["success", "failure"])
    def test_on_the_real_arm_the_human_ends_the_episode(self, button):
        from robot import FeetechBus, RealWorld, ServoEmulator, SO101, SO101Env, chain_calibration
        cfg = Config(control_hz=200.0)
        env = SO101Env(cfg, SO101(FeetechBus(ServoEmulator()), chain_calibration()), {}, RealWorld(cfg))
        obs = env.reset()
        still = np.zeros(4, np.float32)
        t = teleop.Teleop(Scripted((still, set()), (still, set()), (still, {button}), (still, set())))
        transitions, outcome = teleop.record_episode(env, t, teleop.StatusLine(), obs)
        assert outcome == button
        if button == "success":   # the press makes the next step the terminal, rewarded one
            assert len(transitions) == 3 and transitions[-1][4] and transitions[-1][2] == cfg.reward_success
        else:                     # the episode ends where it is, cut short (truncated), not terminal
            assert len(transitions) == 2 and transitions[-1][5] and not transitions[-1][4]


# =================================================================================================
# TestImages: networks.py's image encoders, cached features, the reward classifier, pixels in the sim.
# =================================================================================================


# Vision: the frozen ResNet-10 and its weights, cached
import networks  # noqa: E402
import vision  # noqa: E402


IMAGES = {"front": (64, 64, 3), "wrist": (64, 64, 3)}


def write_safetensors(path, tensors):
    """The .safetensors layout, written by hand: the tests never download the real file."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = t.detach().contiguous().numpy().astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def port_weights(path, seed=1):
    """A ResNet-10 weight file with the HF port's key layout (lerobot/resnet10), random weights."""
    torch.manual_seed(seed)
    backbone = vision.ResNet10()
    write_safetensors(path, {vision.port_key(n): p for n, p in backbone.named_parameters()})
    return backbone


def image_batch(batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = random_batch(batch_size, seed)
    for group in ("obs", "next_obs"):
        b[group]["state"] = torch.randn(batch_size, STATE_DIM, generator=g)
        for name, shape in IMAGES.items():
            b[group][name] = torch.randint(0, 256, (batch_size, *shape), generator=g, dtype=torch.uint8)
    return b


def features_of(agent, obs):
    """obs with each camera's frames replaced by the frozen backbone's features, as FrameFeatures stores them."""
    return {**obs, **{k: torch.mul(*vision.as_stored(agent.backbone(obs[k]))) for k in IMAGES}}


def counting_backbone():
    backbone = vision.ResNet10()
    calls = []
    forward = backbone.forward
    backbone.forward = lambda frames: calls.append(len(frames)) or forward(frames)
    return backbone, calls


def sim_frames(cube_z, seeds, size=64):
    """Front and wrist frames of the sim with the cube at height cube_z (m) above its resting place."""
    import mujoco
    cfg = Config(use_images=True, image_size=size)
    arm, cameras, world = make_sim(cfg, seed=0)
    frames = {"front": [], "wrist": []}
    with SO101Env(cfg, arm, cameras, world) as env:
        for seed in seeds:
            env.reset(seed=seed)
            world.data.qpos[world.cube_qpos + 2] += cube_z
            mujoco.mj_forward(world.model, world.data)
            for name in frames:
                frames[name].append(cameras[name].read())
    return {k: np.stack(v) for k, v in frames.items()}


def pad_and_crop(image, dy, dx, pad=4):
    """DrQ's random shift written as DrQ does it: pad by `pad` replicating the edges, then crop back at the
    offset (pad + dy, pad + dx). image (H, W, C) uint8."""
    h, w, _ = image.shape
    padded = torch.nn.functional.pad(image.permute(2, 0, 1)[None].float(), (pad,) * 4, mode="replicate")[0]
    return padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w].permute(1, 2, 0).to(torch.uint8)


def shift_of(image, original, pad=4):
    """The (dy, dx) within pad by which `image` is `original` shifted, edges replicated; None when it is none."""
    return next(((dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if torch.equal(image, pad_and_crop(original, dy, dx, pad))), None)


class TestImages:
    """networks.py's image encoders, cached features, the reward classifier, pixels in the sim."""

    def test_resnet10_gives_512_maps_at_a_32nd_of_the_side_and_is_frozen(self):
        backbone = vision.ResNet10()
        frames = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8)
        features = backbone(frames)
        assert features.shape == (2, 512, 4, 4) and features.grad_fn is None
        assert not any(p.requires_grad for p in backbone.parameters())
        assert sum(p.numel() for p in backbone.parameters()) == pytest.approx(4.9e6, rel=0.05)

    def test_encoder_appends_256_features_per_camera(self):
        agent = Agent(STATE_DIM, small_cfg(), IMAGES)
        obs = image_batch()["obs"]
        assert agent.encoder(features_of(agent, obs)).shape == (8, 8 + 2 * 256)
        assert agent.act(obs).shape == (8, 4)

    def test_weights_load_from_the_hf_port_layout(self, tmp_path):
        source = port_weights(tmp_path / "resnet10.safetensors")
        names = set(json.loads((tmp_path / "resnet10.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}"))
        assert {"embedder.0.weight", "embedder.1.group_norm.weight", "encoder.stages.0.conv1.conv.weight",
                "encoder.stages.3.shortcut.0.conv.weight", "encoder.stages.3.shortcut.1.group_norm.bias"} <= names
        backbone = vision.ResNet10()
        vision.load_resnet10(backbone, tmp_path / "resnet10.safetensors")
        for p, q in zip(backbone.parameters(), source.parameters()):
            assert torch.equal(p, q)

    def test_weights_with_a_wrong_key_layout_name_the_key(self, tmp_path):
        backbone = vision.ResNet10()
        tensors = {vision.port_key(n): p for n, p in backbone.named_parameters()}
        tensors["stages.0.conv1.weight"] = tensors.pop("encoder.stages.0.conv1.conv.weight")   # torchvision-like name
        write_safetensors(tmp_path / "bad.safetensors", tensors)
        with pytest.raises(ValueError, match=r"bad.safetensors: missing key 'encoder.stages.0.conv1.conv.weight'; "
                                             r"expected the key layout of lerobot/resnet10"):
            vision.load_resnet10(backbone, tmp_path / "bad.safetensors")
        (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
        with pytest.raises(ValueError, match="not a readable .safetensors file"):
            vision.load_resnet10(backbone, tmp_path / "junk.safetensors")

    def test_no_weights_and_no_network_is_one_line_naming_the_file_and_the_setting(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setattr(vision.urllib.request, "urlretrieve", lambda *a: (_ for _ in ()).throw(OSError("offline")))
        with pytest.raises(SystemExit) as exit_info:
            vision.resnet10_weights(Config())
        message = str(exit_info.value)
        assert "\n" not in message and "--resnet_weights FILE" in message and "resnet10.safetensors" in message

    def test_actor_reads_image_features_without_training_the_shared_encoder(self):
        cfg = small_cfg()
        agent = Agent(STATE_DIM, cfg, IMAGES)
        opts = hilserl.make_optimizers(agent, cfg)
        before = copy.deepcopy(agent.state_dict())
        b = image_batch()
        b = {**b, "obs": features_of(agent, b["obs"]), "next_obs": features_of(agent, b["next_obs"])}
        hilserl.actor_step(agent, opts["actor"], opts["temperature"], b["obs"], -2.0)
        after = agent.state_dict()
        changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        assert changed == {"actor", "log_alpha"}
        assert agent.actor.net[0].in_features == 8 + 2 * 256                          # state latent + 2 cameras
        hilserl.critic_step(agent, opts["critic"], b, None, cfg.discount, cfg.tau)
        changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], agent.state_dict()[k])}
        assert {"encoder.images.front.pool", "encoder.images.wrist.proj.0", "grasp_critic.net.0"} <= changed

    def test_the_features_of_a_loaded_buffer_say_how_far_they_are(self, capsys):
        example = {"state": np.zeros(STATE_DIM, np.float32), "front": np.zeros((8, 8, 3), np.uint8)}
        loaded = buffer.ReplayBuffer(3000, example, 4)
        loaded.size = 3000                                                            # as a resume's files fill it
        vision.FrameFeatures(loaded, lambda frames: torch.ones(len(frames), 512, 1, 1), torch.device("cpu"), 4)
        assert capsys.readouterr().out.splitlines() == [
            f"the ResNet-10's features of 3000 stored frames, 4 copies each: {share}" for share in ("0%", "43%", "85%")]

    def test_backbone_runs_once_per_stored_frame_and_never_while_learning(self):
        cfg = small_cfg(utd_ratio=4)
        backbone, calls = counting_backbone()
        example = {"state": np.zeros(STATE_DIM, np.float32), "front": np.zeros(IMAGES["front"], np.uint8)}
        demo, online = buffer.ReplayBuffer(40, example, 4), buffer.ReplayBuffer(40, example, 4)
        rng = np.random.default_rng(0)
        frame = lambda t: {"state": np.full(STATE_DIM, t, np.float32), "front": rng.integers(0, 256, IMAGES["front"], np.uint8)}
        for buf in (demo, online):
            obs = frame(0)
            for t in range(12):                                                        # two episodes of 6 steps
                next_obs = frame(t + 1)
                buf.add(obs, np.zeros(4, np.float32), 0.0, next_obs, t % 6 == 5, False, False)
                obs = frame(t + 1) if t % 6 == 5 else next_obs
        demo_features = vision.FrameFeatures(demo, backbone, torch.device("cpu"))   # loaded buffer: all at once
        online = buffer.ReplayBuffer(40, example, 4)
        online_features = vision.FrameFeatures(online, backbone, torch.device("cpu"))
        calls.clear()
        obs = frame(0)
        for t in range(12):
            next_obs = frame(t + 1)
            online_features.add(online.add(obs, np.zeros(4, np.float32), 0.0, next_obs, t % 6 == 5, False, False))
            obs = frame(t + 1) if t % 6 == 5 else next_obs
        assert sum(calls) == 14                                                       # 2 episodes x (6 steps + 1 frame)
        agent = Agent(STATE_DIM, cfg, {"front": IMAGES["front"]})
        agent.backbone = backbone
        optimizers = hilserl.make_optimizers(agent, cfg)
        for seed in range(3):
            batches = hilserl.control_step_batches(demo, online, cfg, np.random.default_rng(seed), torch.device("cpu"),
                                                   demo_features, online_features)
            hilserl.learn(agent, optimizers, cfg, batches)
        assert sum(calls) == 14                                                       # updates read the cache only
        slots = buffer.sample_batches(demo, online, cfg.utd_ratio, cfg.batch_size, np.random.default_rng(seed), False)["slot"][0]
        frames = np.concatenate([demo.arrays["front"][(slots[:4] + 1) % 40], online.arrays["front"][(slots[4:] + 1) % 40]])
        expected = backbone(torch.from_numpy(frames))
        # stored in a byte a value (half a step: a map's largest / 510), read out in float16 (2^-11 relative)
        bound = expected.amax(dim=(1, 2, 3), keepdim=True) / 510 + expected.abs() / 2 ** 11 + 1e-6
        assert ((batches["next_obs"]["front"][0].float() - expected).abs() <= bound).all()

    def test_random_shift_moves_each_image_by_at_most_pad_with_edges_replicated(self):
        frames = torch.randint(0, 256, (2, 150, 12, 12, 3), dtype=torch.uint8)
        out = vision.random_shift(frames, pad=4)
        assert out.shape == frames.shape
        seen = [shift_of(image, original) for image, original in zip(out.flatten(0, 1), frames.flatten(0, 1))]
        assert None not in seen and len(set(seen)) > 60                               # of 81, each image its own

    def test_the_small_encoder_shifts_obs_and_next_obs_independently_in_every_update(self):
        cfg = small_cfg(encoder="small", image_latent_dim=8, utd_ratio=2)
        agent = Agent(STATE_DIM, cfg, IMAGES)
        optimizers, seen = hilserl.make_optimizers(agent, cfg), []
        b = image_batch()
        b["next_obs"] = {**b["next_obs"], "front": b["obs"]["front"]}                 # the same frames in both
        batches = {k: ({g: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for g, v in x.items()} if isinstance(x, dict)
                       else x.unsqueeze(0).repeat(2, *[1] * x.dim())) for k, x in b.items()}   # (U=2, B, ...)
        record = lambda agent, optimizer, batch, *rest: seen.append(batch) or hilserl.critic_step(agent, optimizer, batch, *rest)
        hilserl.learn(agent, optimizers, cfg, batches, critic_update=record)
        obs, next_obs = ([list(map(shift_of, batch[group]["front"], b["obs"]["front"])) for batch in seen]
                         for group in ("obs", "next_obs"))
        assert None not in obs[0] + obs[1] + next_obs[0] + next_obs[1]                # each row shifted by <= 4 px
        assert len(set(obs[0])) > 1 and len(set(next_obs[0])) > 1                    # each row its own shift,
        assert obs[0] != next_obs[0] and obs[0] != obs[1]                              # drawn anew for each
        assert torch.equal(seen[0]["obs"]["state"], b["obs"]["state"])                # vectors untouched
        unshifted = []
        hilserl.learn(agent, optimizers, dataclasses.replace(cfg, augment=False), batches,
                      critic_update=lambda agent, optimizer, batch, *rest: unshifted.append(batch) or
                      hilserl.critic_step(agent, optimizer, batch, *rest))
        assert torch.equal(unshifted[0]["obs"]["front"], b["obs"]["front"])           # --augment false

    def test_the_small_encoder_learns_from_the_critic_loss_and_never_from_the_actor_loss(self):
        cfg = small_cfg(encoder="small", image_latent_dim=8)
        agent = Agent(STATE_DIM, cfg, IMAGES)
        cnn = [p for name, p in agent.named_parameters() if name.startswith("encoder.images.front.cnn.")]
        assert agent.backbone is None and len(cnn) == 8 and all(p.requires_grad for p in cnn)   # 4 convs
        b = image_batch()
        actor_loss, temperature_loss, _ = hilserl.actor_losses(agent, b["obs"], -2.0)
        (actor_loss + temperature_loss).backward()
        assert all(p.grad is None for p in cnn)
        critic_loss, grasp_loss, _ = hilserl.critic_losses(agent, b, None, cfg.discount)
        (critic_loss + grasp_loss).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cnn)
        assert all(p.grad is None for p in agent.target.parameters())                # the target copy: polyak only

    def test_features_are_kept_in_a_byte_a_value_scaled_to_the_largest_of_their_map(self):
        features = torch.tensor([[0.0, 1.0, 2.55, 0.004]]).view(1, 4, 1, 1)          # one map of 4 channels
        stored, scale = vision.as_stored(features)
        assert stored.dtype == torch.uint8 and stored.flatten().tolist() == [0, 100, 255, 0]
        assert scale.item() == pytest.approx(0.01)                                    # 2.55 / 255

    def test_the_augmented_cache_holds_the_backbone_features_of_shifted_frames(self):
        torch.manual_seed(0)
        backbone = vision.ResNet10()
        example = {"state": np.zeros(STATE_DIM, np.float32), "front": np.zeros((32, 32, 3), np.uint8)}
        demo, rng = buffer.ReplayBuffer(10, example, 4), np.random.default_rng(0)
        frames = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
        for t in range(3):
            demo.add({**example, "front": frames[t]}, np.zeros(4, np.float32), 0.0, {**example, "front": frames[t + 1]},
                     t == 2, False, True)
        cache = vision.FrameFeatures(demo, backbone, torch.device("cpu"), copies=4)
        for slot, frame in enumerate(torch.from_numpy(frames)):
            every_shift = torch.stack([pad_and_crop(frame, dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)])
            exact = backbone(every_shift)                                                 # (81, 512, 1, 1)
            # one byte a value: within half a step (the map's largest / 510) of the backbone's own, float16 aside
            bound = exact.amax(dim=(1, 2, 3), keepdim=True) / 510 + exact.abs() / 2 ** 11 + 1e-6
            matches = []
            for copy_index in range(4):
                stored = cache.read("front", torch.tensor(slot), torch.tensor(copy_index)).float()
                matches.append([i for i in range(81) if ((stored - exact[i]).abs() <= bound[i]).all()])
            assert matches[0] == [40]                                                    # the first copy: unshifted
            assert all(matches[1:]) and len({m[0] for m in matches}) > 2                # the others: shifted frames
        cfg = small_cfg(utd_ratio=3, batch_size=8)
        batches = hilserl.control_step_batches(demo, demo, cfg, rng, torch.device("cpu"), cache, cache)
        for group in ("obs", "next_obs"):                                                # each row: one of its copies
            rows = batches[group]["front"].flatten(0, 1).float()                         # (U B, 512, 1, 1)
            copies = torch.stack([cache.read("front", torch.tensor(s), torch.arange(4)).float() for s in range(4)])
            assert all(any(torch.equal(row, c) for c in copies.flatten(0, 1)) for row in rows)
            assert len({tuple(row.flatten().tolist()) for row in rows}) > 4              # not always the same copy

    def test_a_checkpoint_refuses_the_other_encoder_in_one_line(self, tmp_path):
        cfg = small_cfg(encoder="small", image_latent_dim=8)
        agent = Agent(STATE_DIM, cfg, IMAGES)
        run = types.SimpleNamespace(agent=agent, progress={"episode": 3}, folder=tmp_path, rows=[],
                                    optimizers=hilserl.make_optimizers(agent, cfg))
        hilserl.save_checkpoint(run)
        assert hilserl.load_checkpoint(tmp_path, Agent(STATE_DIM, cfg, IMAGES)) == {"episode": 3}
        with pytest.raises(SystemExit) as exit_info:
            hilserl.load_checkpoint(tmp_path, Agent(STATE_DIM, dataclasses.replace(cfg, encoder="resnet10"), IMAGES))
        message = str(exit_info.value)
        assert "\n" not in message and re.fullmatch(r"error: .*checkpoint.pt was trained with --encoder small; "
                                                    r"pass --encoder small, .*", message), message

    def test_counting_operator_calls_prints_nothing_of_the_profilers_own(self, capfd):
        assert bench.operator_calls(lambda: torch.ones(4) * 2) >= 1
        out, err = capfd.readouterr()
        assert out == "" and "profiler_start" not in err and err == ""                   # its USDT lines

    def test_bench_images_prints_both_encoders_and_what_the_augmentation_keeps(self, capsys):
        bench.bench_images(small_cfg(image_size=32, utd_ratio=2, image_latent_dim=8), torch.device("cpu"), slots=40)
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 5 and all(re.search(r"\d+\.\d \(act +\d+\.\d, store +\d+\.\d, updates", x) for x in lines[1:])
        # at 32x32 a camera's features are 512 x 1 x 1 bytes and a float32 scale, once or 4 times a frame
        assert [re.search(r"features: (\S+) GB", x)[1] for x in lines[1:]] == ["0.05", "0.21", "0.00", "0.00"]
        assert [x.split(":")[0].split() for x in lines[1:]] == [["resnet10,", "augment", a] for a in ("off", "on")] + \
            [["small,", "augment", a] for a in ("off", "on")]

    def test_classifier_learns_to_tell_a_lifted_cube_from_one_on_the_table(self):
        cfg = small_cfg(hidden_dim=64)
        resting, lifted = sim_frames(0.0, range(24)), sim_frames(0.08, range(24))   # random backbone weights
        frames = {k: np.concatenate([resting[k], lifted[k]]) for k in resting}
        labels = np.repeat([0.0, 1.0], 24).astype(np.float32)
        held_out = np.arange(48) % 4 == 3                                             # cube places never trained on
        torch.manual_seed(0)
        model = classifier.RewardClassifier(IMAGES, cfg)
        features = {k: classifier.backbone_features(model.backbone, f, torch.device("cpu")) for k, f in frames.items()}
        rng = np.random.default_rng(0)
        classifier.fit_classifier(model, features, labels, np.flatnonzero(~held_out), 150, rng, batch_size=32)
        assert classifier.precision_recall(model, features, labels, np.flatnonzero(held_out)) == (6, 6, 6)   # all right

    def test_the_classifier_holds_out_success_episodes_and_is_not_saved_below_its_floor(self, tmp_path, capsys):
        episodes = np.repeat(np.arange(7), 10)                                        # 7 episodes of 10 frames
        success = np.tile(np.arange(10) >= 7, 7) & (episodes != 6)                    # the last has no success
        rng = np.random.default_rng(0)
        frames = {"front": rng.integers(0, 256, (70, 32, 32, 3), np.uint8), "success": success, "episode": episodes}
        np.savez(tmp_path / "frames.npz", **frames)
        _, labels, held_out = classifier.classifier_data(tmp_path / "frames.npz")
        assert sorted(set(episodes[held_out])) == [4, 6]                              # a fifth of each kind
        np.savez(tmp_path / "one.npz", **{**frames, "success": success & (episodes == 2)})
        with pytest.raises(ValueError, match="one.npz: fewer than two episodes hold success frames, so none can be "
                                             "held out to measure the classifier's recall"):
            classifier.classifier_data(tmp_path / "one.npz")
        port_weights(tmp_path / "resnet10.safetensors")
        cfg = Config(frames=str(tmp_path / "frames.npz"), classifier=str(tmp_path / "c.pt"), classifier_steps=2,
                     resnet_weights=str(tmp_path / "resnet10.safetensors"), hidden_dim=16, image_latent_dim=8,
                     classifier_floor="1,1")                                          # noise frames: never perfect
        with pytest.raises(ValueError, match=r"^below --classifier_floor 1,1 \(precision,recall\), so not saved"):
            classifier.train_classifier(cfg)
        assert not (tmp_path / "c.pt").exists()
        assert re.search(r"held out 20 frames of 70: precision \d+% \(\d+ of \d+ called success\), recall \d+% "
                         r"\(\d+ of 3 successes\)", capsys.readouterr().out)            # episode 4's 3 success frames
        classifier.train_classifier(dataclasses.replace(cfg, classifier_force=True))
        assert (tmp_path / "c.pt").exists()

    def test_pixels_only_on_the_sim_train_eval_and_classifier(self, tmp_path, monkeypatch, capsys):
        """The whole pixel loop without privileged cube state: demos with frames, training on cached
        ResNet-10 features (weights from a file the test makes), evaluation, the reward classifier."""
        port_weights(tmp_path / "resnet10.safetensors")
        demos, run, clf = tmp_path / "demos.npz", tmp_path / "run", tmp_path / "classifier.pt"
        pixels = ["--use_images", "true", "--privileged_state", "false", "--image_size", "32",
                  "--resnet_weights", str(tmp_path / "resnet10.safetensors"), "--demos", str(demos)]
        small = ["--hidden_dim", "32", "--state_latent_dim", "16", "--image_latent_dim", "16", "--batch_size", "16",
                 "--utd_ratio", "2", "--training_starts", "20", "--demo_episodes", "5", "--episode_steps", "30",
                 "--replay_capacity", "1000", "--demo_capacity", "1000"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--run_dir", str(run), "--max_env_steps", "60", *pixels, *small])
        hilserl.main()
        rows = list(csv.DictReader(open(run / "log.csv")))
        assert int(rows[-1]["env_steps"]) >= 60 and float(rows[-1]["loss/critic"]) >= 0
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--eval", str(run), "--eval_episodes", "1"])
        hilserl.main()
        with pytest.raises(ValueError, match="demos.npz holds no labelled frames; record them with python teleop.py label"):
            classifier.train_classifier(Config(frames=str(demos), classifier=str(clf)))
        frames = str(tmp_path / "frames.npz")
        held = teleop.label_frames(label_cfg(privileged_state=False), frames, success_frames=1)   # 5 episodes at least
        monkeypatch.setattr("sys.argv", ["classifier.py", "--frames", frames, "--classifier", str(clf),
                                         "--classifier_steps", "5", "--classifier_force", "true", *pixels, *small])
        runpy.run_path("classifier.py", run_name="__main__")                        # random weights: forced
        figures = (r"held out \d+ frames of 200: precision \d+% \((\d+) of \d+ called success\), recall \d+% "
                   r"\(\1 of [1-9]\d* successes\) at threshold 0.7")
        assert re.search(rf"{held} success frames; {figures}", capsys.readouterr().out)
        cfg = Config(classifier=str(clf), image_latent_dim=16, hidden_dim=32, use_images=True, image_size=32,
                     privileged_state=False)
        arm, cameras, world = make_sim(cfg, seed=3)
        with SO101Env(cfg, arm, cameras, world) as env:
            env.classifier = lambda obs: True                                          # a classifier that always says yes
            env.reset(seed=3)
            assert env.step(np.zeros(4, np.float32))[2]                                # ends the episode as a success
            env.classifier = classifier.load_classifier(cfg, torch.device("cpu")).success
            assert re.fullmatch(rf"--classifier {re.escape(str(clf))}: {figures}\n", capsys.readouterr().out)
            assert isinstance(env.step(np.zeros(4, np.float32))[2], bool)


# =================================================================================================
# TestBadInput: every command's answer to input a user can get wrong: one line, never a traceback.
# =================================================================================================


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files a user could pass by mistake, by name: {name: path}."""
    d = tmp_path_factory.mktemp("bad")
    state = {"state": np.zeros(12, np.float32)}
    demos = buffer.ReplayBuffer(50, state, 4)
    for t in range(20):
        demos.add(state, np.zeros(4, np.float32), 0.0, state, t % 10 == 9, False, True)
    demos.save(d / "demos.npz")
    buffer.ReplayBuffer(5, state, 4).save(d / "empty.npz")
    (d / "cut.npz").write_bytes((d / "demos.npz").read_bytes()[:300])
    (d / "garbage").write_text("not what it should be")
    with open(d / "array.npy", "wb") as f:
        np.save(f, np.zeros(3))
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    np.savez(d / "frames.npz", front=frames, wrist=frames, success=np.arange(10) % 2 == 0, episode=np.arange(10))
    for name, settings, checkpoint in (("null_config", {"hidden_dim": None}, None),
                                       ("foreign_checkpoint", {}, {})):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(settings))
        if checkpoint is not None:
            torch.save(checkpoint, d / name / "checkpoint.pt")
    (d / "run").mkdir()
    (d / "run" / "log.csv").write_text("episode,env_steps\n1,10\n")
    for name, log in (("empty_run", ""), ("garbage_run", "\x00\x13 not a log\n,,,\n")):
        (d / name).mkdir()
        (d / name / "log.csv").write_text(log)
    os.mkfifo(d / "fifo")                                             # reading it would wait for a writer forever
    robot.save_calibration(d / "calibration.json", robot.chain_calibration())
    master, servant = os.openpty()                                    # a serial port where no servo answers
    return {**{p.name.split(".")[0]: str(p) for p in d.iterdir()}, "dir": str(d), "silent_port": os.ttyname(servant)}


BAD_INPUT = [   # (command line, the one line it answers); {name}: a file of bad_files
    ("hilserl.py --utd_ratio 0", "--utd_ratio 0: must be >= 1"),
    ("hilserl.py --device cuda:3", "--device 'cuda:3': not here"),
    ("hilserl.py --cameras front", "--cameras 'front': must be name=index-or-path"),
    ("hilserl.py --camera_roi back=0:0:10:10", "no camera 'back' in --cameras"),
    ("hilserl.py train", "unexpected 'train'"),
    ("hilserl.py --demos {array} --run_dir {dir}/r1", "array.npy: not a readable .npz file"),
    ("hilserl.py --demos {cut} --run_dir {dir}/r2", "cut.npz: not a readable .npz file"),
    ("hilserl.py --demos {empty} --run_dir {dir}/r3", "empty.npz holds no transitions"),
    ("hilserl.py --demos {demos} --run_dir {dir}/run", "already holds a run; continue it with --resume"),
    ("hilserl.py --demos {demos} --run_dir /proc/no/run", "No such file or directory"),
    ("hilserl.py --demos {demos} --run_dir {dir}/r4 --classifier {garbage}", "judges camera frames; add --use_images true"),
    ("hilserl.py --demos {demos} --run_dir {dir}/r5 --teleop gamepad", "no gamepad found"),
    ("hilserl.py --resume {null_config}", "missing or not a config.json that hilserl.py wrote"),
    ("hilserl.py --eval {foreign_checkpoint}", "checkpoint.pt: not a readable checkpoint"),
    ("hilserl.py --plot {run},{run}/log.csv", "then the PNG to write"),
    ("hilserl.py --plot {dir}/nowhere,out.png", "then the PNG to write"),
    ("teleop.py record --demos {array}", "array.npy: not a readable .npz file"),
    ("teleop.py label --frames {cut} --image_size 32", "cut.npz: not a readable .npz file"),
    ("teleop.py record --port {silent_port} --calibration {garbage}", "calibration"),
    ("teleop.py record --port {silent_port} --calibration {calibration}", "shoulder_pan (id 1) does not answer"),
    ("hilserl.py --port {silent_port} --calibration {calibration} --demos {demos} --run_dir {dir}/r6", "does not answer"),
    ("teleop.py dance", "usage: python teleop.py record"),
    ("robot.py --port {dir}/no_such_port status", "cannot open"),
    ("robot.py --port {silent_port} calibrate", "calibration not saved: SO-101: shoulder_pan (id 1) does not answer"),
    ("classifier.py --frames {cut} --classifier {dir}/c.pt", "cut.npz: not a readable .npz file"),
    ("classifier.py --frames {frames} --classifier /proc/no/c.pt", "give a file in a folder that can be written to"),
    ("classifier.py --frames {frames} --classifier {dir}/c.pt --resnet_weights {garbage}", "not a readable .safetensors"),
    ("classifier.py --frames {demos} --classifier {dir}/c.pt", "holds no labelled frames"),
    ("bench.py sprint", "usage: python bench.py"),
    ("hilserl.py --cameras front=0,front=1", "--cameras 'front=0,front=1': each camera needs a name of its own"),
    ("hilserl.py --control_hz 1000", "--sim_timestep_s 0.002: the sim needs at least one physics step per control"),
    ("hilserl.py --sim_timestep_s 0.5", "the sim needs at least one physics step per control step; lower one"),
    ("hilserl.py --replay_capacity 8 --training_starts 10", "--training_starts 10: must be below --replay_capacity 8"),
    ("hilserl.py --reward_success nan", "--reward_success nan: must be a finite number"),
    ("hilserl.py --seed -1", "--seed -1: must be >= 0"),
    ("hilserl.py --resume {run} --demos {demos}", "keeps its own demos"),
    ("hilserl.py --eval {run} --resume {run}", "pick one run folder"),
    ("hilserl.py --plot {empty_run},{dir}/out.png", "empty_run/log.csv: no episode rows of hilserl.py's"),
    ("hilserl.py --plot {garbage_run},{dir}/out.png", "garbage_run/log.csv: no episode rows of hilserl.py's"),
    ("hilserl.py --demos {fifo} --run_dir {dir}/r7", "fifo: not a regular file"),
    ("hilserl.py --demos /proc/nope.npz --run_dir {dir}/r8", "/proc/nope.npz: cannot write in /proc"),
    ("teleop.py record --demos /proc/nope/x.npz", "/proc/nope/x.npz: cannot write in /proc/nope"),
    ("teleop.py label --frames /proc/nope/f.npz", "/proc/nope/f.npz: cannot write in /proc/nope"),
    ("hilserl.py --teleop virtual --demos {demos} --run_dir {dir}/r9", "the virtual arm's operator needs its arm"),
]


class TestBadInput:
    """Every command's answer to input a user can get wrong: one line, never a traceback."""

    @pytest.mark.parametrize("command, says", BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
    def test_bad_input_is_one_line_without_a_traceback(self, command, says, bad_files, monkeypatch, capsys):
        script, *args = command.format(**bad_files).split()
        monkeypatch.setattr("sys.argv", [script, *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")
        out, err = capsys.readouterr()
        answer = err.strip() if isinstance(exit_info.value.code, int) else str(exit_info.value)   # load_config prints
        print(out, err, answer)                                                  # for -rP | grep -c Traceback
        assert says in answer and "\n" not in answer and "Traceback" not in out + err

    def test_a_device_that_is_not_there_leaves_no_run_folder_behind(self, bad_files, monkeypatch):
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--teleop", "virtual", "--demos", bad_files["demos"],
                                         "--run_dir", f"{bad_files['dir']}/not_made"])
        with pytest.raises(SystemExit, match="needs its arm"):
            hilserl.main()
        assert not os.path.exists(f"{bad_files['dir']}/not_made")                 # the same --run_dir works next time


# =================================================================================================
# TestVirtualArm: sim.py serve, the real-arm path on a pseudo-terminal and camera streams.
# =================================================================================================


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestVirtualArm:
    """sim.py serve: the twin in real time behind a serial port and camera streams, driven as a real arm."""

    def test_status_calibrate_and_a_real_time_env_with_streamed_cameras(self, capsys):
        import urllib.request

        import serial
        from sim import VirtualArm
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = Config(serve_http_port=port, use_images=True, image_size=32, cameras=f"front={url}/front,wrist={url}/wrist")
        virtual = VirtualArm(cfg)
        hand = lambda pose: urllib.request.urlopen(f"{url}/hand?pose={pose}").read()   # noqa: E731
        def owner(prompt):                                         # calibrate's prompts, answered by the scripted hand
            hand("centre" if "middle" in prompt else "sweep")
            time.sleep(1.5 if "middle" in prompt else 5.0)
        try:
            bus = FeetechBus(serial.Serial(virtual.port, cfg.baudrate), cfg.baudrate, 2, 0.02)
            robot.print_status(bus)
            assert len(re.findall(r" 25 +7\.4 ", capsys.readouterr().out)) == 6          # every servo answers
            with robot.SO101(bus, None) as arm:
                arm.connect()
                arm.configure()
                calibration = robot.calibrate(arm, owner)
            hand("free")
            for name, servo_id in zip(robot.JOINTS[:4], IDS):                           # centred where the build left it
                assert abs(calibration[name].homing_offset - 1 - virtual.world.assembly_ticks[servo_id - 1]) <= 3
                low, high = robot.SO101_CHAIN[servo_id][6]
                assert calibration[name].range_max - calibration[name].range_min > 0.95 * (high - low) * TICKS_PER_RAD
            env = SO101Env(cfg, robot.SO101(bus, calibration), robot.make_cameras(cfg), robot.RealWorld(cfg))
            with env:
                obs = env.reset()
                assert obs["front"].shape == (32, 32, 3) and obs["front"].std() > 0                  # a rendered scene
                np.testing.assert_allclose(obs["state"][:4], robot.HOME_RAD[:4], atol=0.05)
                start = robot.forward_kinematics(obs["state"][:5])[0]
                for _ in range(5):
                    obs = env.step(np.array([1.0, 0, 0, 0], np.float32))[0]
                assert robot.forward_kinematics(obs["state"][:5])[0][0] - start[0] > 0.03            # +x, on the clock
            assert all(virtual.emulator.get(i, "Torque_Enable") == 0 for i in IDS)
        finally:
            virtual.close()

    def test_a_soak_with_five_percent_faults_through_its_port_returns_no_wrong_value(self, capsys):
        bench.bench_soak(Config(serve_http_port=free_port()), n=1000)
        out = capsys.readouterr().out
        assert re.search(r"1000 transactions .* [3-9]\d faults injected .*: 0 wrong values, 0 errors", out), out

    def test_the_real_arm_workflow_end_to_end_on_the_virtual_arm(self, tmp_path):
        """calibrate -> record 2 demos -> label frames -> train the classifier -> train (the small encoder, the
        classifier deciding success too) -> kill -9 -> resume -> Ctrl-C, SIGTERM, SIGHUP, a servo error -> eval, every program on
        the virtual arm's serial port and camera streams as on a real arm, the human scripted; on the wire:
        torque off after every exit but the kill, and no goal outside the calibrated limits."""
        import subprocess
        import urllib.request

        import serial
        from sim import VirtualArm
        port, out = free_port(), tmp_path / "out.txt"
        virtual = VirtualArm(Config(serve_http_port=port))
        hand = lambda pose: urllib.request.urlopen(f"http://127.0.0.1:{port}/hand?pose={pose}").read()   # noqa: E731
        try:
            bus = FeetechBus(serial.Serial(virtual.port, 1_000_000), 1_000_000, 2, 0.02)
            with robot.SO101(bus, None) as arm:
                arm.connect()
                arm.configure()
                calibration = robot.calibrate(arm, lambda prompt: hand("centre" if "middle" in prompt else "sweep")
                                              or time.sleep(1.5 if "middle" in prompt else 5.0))
                arm.calibration = calibration
                arm.configure()
            hand("free")
            bus.port.close()
            robot.save_calibration(tmp_path / "calibration.json", calibration)
            calibrated_from = len(virtual.emulator.received)
            url = f"http://127.0.0.1:{port}"
            port_weights(tmp_path / "resnet10.safetensors")                          # random: no download in a test
            real = ["--port", virtual.port, "--calibration", str(tmp_path / "calibration.json"), "--teleop", "virtual",
                    "--serve_http_port", str(port), "--episode_steps", "50", "--use_images", "true", "--image_size", "32",
                    "--cameras", f"front={url}/front,wrist={url}/wrist", "--resnet_weights",
                    str(tmp_path / "resnet10.safetensors"), "--hidden_dim", "16", "--image_latent_dim", "8"]
            small = ["--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1", "--training_starts", "20",
                     "--checkpoint_every", "1", "--classifier", str(tmp_path / "classifier.pt"), "--encoder", "small"]
            run, demos = tmp_path / "run", str(tmp_path / "demos.npz")

            def start(*args):   # SIGINT as at a terminal, also when this runs in the background (it would be ignored)
                return subprocess.Popen([sys.executable, *args, *real], stdout=open(out, "w"), stderr=subprocess.STDOUT,
                                        cwd=os.path.dirname(os.path.abspath(__file__)),
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

            def torque_off():
                return all(virtual.emulator.get(i, "Torque_Enable") == 0 for i in IDS)

            def until_training(process):                                              # an episode line is printed
                while not re.search(r"updates/s", out.read_text()):
                    assert process.poll() is None, out.read_text()
                    time.sleep(0.1)

            assert start("teleop.py", "record", "--demos", demos, "--demo_episodes", "2", "--demo_keep_failed",
                         "true").wait() == 0 and torque_off(), out.read_text()
            assert np.load(demos)["front"].shape[1:] == (32, 32, 3)                  # the streamed cameras' frames
            assert start("teleop.py", "label", "--frames", str(tmp_path / "frames.npz"), "--success_frames",
                         "60").wait() == 0 and torque_off(), out.read_text()   # > 50 steps: two episodes at least
            assert start("classifier.py", "--frames", str(tmp_path / "frames.npz"), "--classifier",
                         str(tmp_path / "classifier.pt"), "--classifier_steps", "5", "--classifier_force",
                         "true").wait() == 0, out.read_text()                        # random weights: forced
            process = start("hilserl.py", "--demos", demos, "--run_dir", str(run), "--max_env_steps", "400", *small)
            until_training(process)
            process.send_signal(signal.SIGKILL)                                       # nothing runs on its way out
            process.wait()
            printed = int(re.findall(r"^episode +(\d+) .* updates/s$", out.read_text(), re.M)[-1])
            for ending in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                process = start("hilserl.py", "--resume", str(run), *small)
                until_training(process)
                process.send_signal(ending)
                assert process.wait() != 0 and torque_off(), (ending, out.read_text())
            episodes = sorted(run.glob("episodes/episode_*.npz"))
            assert len(episodes) >= printed + 3                                     # nothing printed was lost
            process = start("hilserl.py", "--resume", str(run), *small)
            until_training(process)
            virtual.emulator.set(3, "Status", 0x20)                                  # elbow_flex: an overload latched
            assert process.wait() == 1 and torque_off() and "reports overload" in out.read_text(), out.read_text()
            virtual.emulator.set(3, "Status", 0)
            assert start("hilserl.py", "--eval", str(run), "--eval_episodes", "1").wait() == 0 and torque_off()
            assert re.search(r"eval .*: success \d+% over 1 episodes", out.read_text()), out.read_text()
            goals = [p for p in virtual.emulator.received[calibrated_from:] if p[4] == robot.SYNC_WRITE and p[5] == 42]
            assert len(goals) > 300
            for p in goals:                                                           # (id, 2 bytes) per servo
                for k in range(7, len(p) - 1, 3):
                    c = calibration[robot.JOINTS[p[k] - 1]]
                    assert c.range_min <= robot.register_value("Goal_Position", p[k + 1:k + 3]) <= c.range_max
        finally:
            virtual.close()

    def test_a_camera_stream_that_ends_is_one_error_without_the_video_library_noise(self, capfd):
        from sim import VirtualArm
        port = free_port()
        virtual = VirtualArm(Config(serve_http_port=port))
        deadline = time.monotonic() + 30
        while "front" not in virtual.frames and time.monotonic() < deadline:     # its first frame is rendered
            time.sleep(0.01)
        try:
            camera = robot.Camera("front", f"http://127.0.0.1:{port}/front", 32, timeout_s=5.0)
        finally:
            virtual.close()                                                      # the stream ends mid-frame
        camera._thread.join(timeout=10)
        with pytest.raises(robot.RobotError, match="camera 'front' .* stopped delivering frames"):
            camera.read()
        camera.close()
        assert capfd.readouterr().err == ""                                      # FFmpeg's lines are not shown

    def test_a_pulled_cable_keeps_every_printed_episode_and_says_how_to_resume(self, tmp_path):
        """sim.py serve stops mid-run, the port's far end gone and the camera streams cut: one line that names the
        port, the cable and the power, and the resume command, with no video library noise; the checkpoint holds
        every printed episode, and the resumed run goes on after the last."""
        import subprocess
        from sim import VirtualArm
        port, out = free_port(), tmp_path / "out.txt"
        url, run, demos = f"http://127.0.0.1:{port}", tmp_path / "run", str(tmp_path / "demos.npz")
        settings = ["--use_images", "true", "--image_size", "32", "--encoder", "small", "--episode_steps", "20",
                    "--hidden_dim", "16", "--image_latent_dim", "8", "--state_latent_dim", "8", "--batch_size", "16",
                    "--utd_ratio", "1", "--training_starts", "10", "--privileged_state", "false"]
        subprocess.run([sys.executable, "teleop.py", "record", "--demos", demos, "--demo_episodes", "2", *settings],
                       cwd=os.path.dirname(os.path.abspath(__file__)), check=True)   # the sim's: the same obs

        def start(virtual, *args):
            calibration = {name: robot.JointCalibration(i, 0, int(virtual.world.assembly_ticks[i - 1]),
                                                        c.range_min, c.range_max)        # as calibrate finds it
                           for (name, c), i in zip(robot.chain_calibration().items(), IDS)}
            robot.save_calibration(tmp_path / "calibration.json", calibration)
            return subprocess.Popen([sys.executable, "hilserl.py", *args, *settings, "--port", virtual.port,
                                     "--calibration", str(tmp_path / "calibration.json"), "--teleop", "virtual",
                                     "--serve_http_port", str(port), "--cameras", f"front={url}/front,wrist={url}/wrist"],
                                    stdout=open(out, "w"), stderr=subprocess.STDOUT,
                                    cwd=os.path.dirname(os.path.abspath(__file__)))

        virtual = VirtualArm(Config(serve_http_port=port))
        try:
            process, deadline = start(virtual, "--demos", demos, "--run_dir", str(run)), time.monotonic() + 600
            while len(re.findall(r"updates/s$", out.read_text(), re.M)) < 2:                # two episodes trained
                assert process.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.1)
        finally:
            virtual.close()                                                                 # the cable is pulled
        assert process.wait() == 1
        text = out.read_text()
        printed = int(re.findall(r"^episode +(\d+) .* updates/s$", text, re.M)[-1])
        assert re.fullmatch(rf"error: the arm's serial port {virtual.port} failed \((write|read)\b.*\): check its "
                            rf"USB cable and the arm's power; then continue with: python hilserl.py --resume {run}",
                            text.strip().splitlines()[-1]), text
        assert "[http @" not in text and "Stream ends" not in text, text                  # no video library noise
        assert torch.load(run / "checkpoint.pt")["progress"]["episode"] == printed
        virtual = VirtualArm(Config(serve_http_port=port))                                  # plugged in again
        try:
            process, deadline = start(virtual, "--resume", str(run)), time.monotonic() + 600
            while "resumed" not in out.read_text():
                assert process.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)      # not SIGINT: a process started in the background ignores it
            process.wait(timeout=120)
        finally:
            virtual.close()
        assert f"resumed {run} at episode {printed}," in out.read_text(), out.read_text()

    @pytest.mark.parametrize("wrong", [None, "shoulder_pan"])
    def test_the_bring_up_check_names_a_joint_with_a_wrong_offset(self, wrong, monkeypatch):
        import serial
        from sim import VirtualArm
        virtual = VirtualArm(Config(serve_http_port=free_port()))
        true = {name: robot.JointCalibration(servo_id, 0, int(virtual.world.assembly_ticks[servo_id - 1]),
                                             c.range_min, c.range_max)
                for (name, c), servo_id in zip(robot.chain_calibration().items(), IDS)}
        if wrong:                                                   # centred 500 ticks (44 deg) off when calibrated
            true[wrong] = dataclasses.replace(true[wrong], homing_offset=true[wrong].homing_offset + 500)
        tool, moves = virtual.world.tool_site, []
        move_to = robot.move_to
        def watched_move(*args):                                    # where the tool truly is after each move
            reached = move_to(*args)
            with virtual.lock:
                moves.append(virtual.world.data.site_xpos[tool].copy())
            return reached
        def owner(prompt):                                          # looks at the arm: did it go the asked way?
            if "gripper move" not in prompt:
                return "y"
            d, axis = moves[-1] - moves[-2], ["forward" in prompt, "left" in prompt, "up" in prompt].index(True)
            return "y" if d[axis] > 0.8 * np.linalg.norm(d) else "n"
        monkeypatch.setattr(robot, "move_to", watched_move)
        try:
            bus = FeetechBus(serial.Serial(virtual.port, 1_000_000), 1_000_000, 2, 0.02)
            with robot.SO101(bus, true) as arm:
                arm.connect()
                arm.configure()
                problems = robot.check(arm, owner)
            bus.port.close()
        finally:
            virtual.close()
        print(problems)
        assert all(virtual.emulator.get(i, "Torque_Limit") == 1000 for i in IDS)      # full strength again
        if wrong:
            assert any("wrong way" in p and wrong in p for p in problems), problems
        else:
            assert problems == []

    def test_a_state_only_real_run_opens_no_camera(self, tmp_path):
        from sim import VirtualArm
        virtual = VirtualArm(Config(serve_http_port=free_port()))
        robot.save_calibration(tmp_path / "calibration.json", robot.chain_calibration())
        try:
            cfg = Config(port=virtual.port, calibration=str(tmp_path / "calibration.json"), cameras="front=/no/camera")
            with teleop.make_env(cfg) as env:                                        # no camera is plugged in
                assert env.cameras == {} and set(env.reset()) == {"state"}
            with pytest.raises(robot.RobotError, match="camera 'front' .*cannot be opened"):
                teleop.make_env(dataclasses.replace(cfg, use_images=True))
        finally:
            virtual.close()


# =================================================================================================
# TestLeRobotImport: teleop.py import-lerobot: a LeRobot dataset of an SO-101 follower as a demo file.
# =================================================================================================


# Ranges whose middles (degrees' zero) are not the model's zero; wrist_roll turns fully, as LeRobot sets it.
LEROBOT_CALIBRATION = {name: robot.JointCalibration(servo_id, 0, 0, low, high) for name, servo_id, (low, high) in zip(
    robot.JOINTS, IDS, [(1000, 3000), (900, 3300), (1100, 3000), (1000, 3100), (0, 4095), (2000, 3000)])}
HOME = robot.HOME_RAD
# The poses kept at 10 Hz (5 joint rad, gripper opening); the dataset's 30 Hz puts two SKIPPED frames between them.
LEROBOT_EPISODES = [
    [(HOME, 0.8), (HOME + [0.03, 0, 0, 0, 0], 0.3), (HOME + [0.03, 0.25, 0, 0, 0], 0.31)],
    [(HOME, 0.2), (HOME + [0, 0, -0.005, 0, 0], 0.19), (HOME + [0, 0, -0.01, 0, 0.5], 0.6),
     (HOME + [-0.4, 0, -0.01, 0, 0.5], 0.9)],
]
SKIPPED = (HOME + 0.5, 0.5)
# LeRobot's data_path and video_path templates (lerobot/datasets/utils.py; v2.1 in convert_dataset_v21_to_v30.py)
LEROBOT_PATHS = {"v3.0": ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                          "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"),
                 "v2.1": ("data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                          "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")}


def lerobot_degrees(q_rad, opening):
    """What LeRobot's so101_follower records (use_degrees): degrees from mid-range, 360 per 4095 ticks; gripper 0..100."""
    low, high = (np.array([getattr(LEROBOT_CALIBRATION[name], field) for name in robot.JOINTS[:5]])
                 for field in ("range_min", "range_max"))
    return np.append((2048 + np.asarray(q_rad) * TICKS_PER_RAD - (low + high) / 2) * 360 / 4095, 100 * opening)


def write_video(path, levels, fps):
    """An AV1 video, as LeRobot encodes, of grey frames at `levels`: each frame says which it is."""
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libsvtav1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for level in levels:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), level, np.uint8), format="rgb24")))
        out.mux(stream.encode())


def write_lerobot(root, version="v3.0", fps=30, robot_type="so101_follower", names=None, cameras=("front",)):
    """LEROBOT_EPISODES as a LeRobot dataset folder, laid out as LeRobot's writer does, and the arm's calibration.
    The frame at dataset index g is grey level 10 + 12 g in every camera."""
    import pyarrow as pa   # requirements-lerobot.txt, which README's setup installs: missing, the test fails
    import pyarrow.parquet as pq
    data_path, video_path = LEROBOT_PATHS[version]
    tables, episodes, g = [], [], 0                                   # g: the dataset index of an episode's first frame
    for e, poses in enumerate(LEROBOT_EPISODES):
        frames = [poses[0], *[pose for kept in poses[1:] for pose in (SKIPPED, SKIPPED, kept)]]   # at 30 Hz
        states = [list(lerobot_degrees(*pose)) for pose in frames]
        n, floats = len(states), pa.list_(pa.float32())
        tables.append(pa.table({"episode_index": [e] * n, "frame_index": range(n), "index": range(g, g + n),
                                "timestamp": pa.array(np.arange(n) / fps, pa.float32()),
                                "observation.state": pa.array(states, floats), "action": pa.array(states, floats)}))
        episodes.append({"episode_index": e, "length": n, "dataset_from_index": g, "dataset_to_index": g + n})
        for key in (f"videos/observation.images.{c}/" for c in cameras):     # v3.0: the episodes follow each other
            episodes[-1].update({key + "chunk_index": 0, key + "file_index": 0, key + "from_timestamp": g / fps,
                                 key + "to_timestamp": (g + n) / fps})
        g += n
    levels = [10 + 12 * i for i in range(g)]
    if version == "v3.0":   # one parquet file and one video per camera for all; meta/episodes says where each starts
        (root / "meta/episodes/chunk-000").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(episodes), root / "meta/episodes/chunk-000/file-000.parquet")
        files = [(pa.concat_tables(tables), levels, {"chunk_index": 0, "file_index": 0})]
    else:                   # a parquet file and a video per episode, listed in meta/episodes.jsonl
        (root / "meta").mkdir()
        (root / "meta/episodes.jsonl").write_text("".join(json.dumps({k: ep[k] for k in ("episode_index", "length")}) + "\n"
                                                          for ep in episodes))
        files = [(table, levels[ep["dataset_from_index"]:ep["dataset_to_index"]],
                  {"episode_chunk": 0, "episode_index": ep["episode_index"]}) for table, ep in zip(tables, episodes)]
    for table, file_levels, where in files:
        (root / data_path.format(**where)).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / data_path.format(**where))
        for c in cameras:
            write_video(root / video_path.format(video_key=f"observation.images.{c}", **where), file_levels, fps)
    state = {"dtype": "float32", "shape": [6], "names": names or [f"{name}.pos" for name in robot.JOINTS]}
    (root / "meta/info.json").write_text(json.dumps({
        "codebase_version": version, "robot_type": robot_type, "fps": fps, "total_episodes": len(episodes),
        "total_frames": g, "chunks_size": 1000, "data_path": data_path, "video_path": video_path,
        "features": {"observation.state": state, "action": state,
                     **{f"observation.images.{c}": {"dtype": "video", "shape": [48, 64, 3],
                                                    "names": ["height", "width", "channels"]} for c in cameras},
                     **{k: {"dtype": "int64", "shape": [1], "names": None}
                        for k in ("episode_index", "frame_index", "index")}}}))
    robot.save_calibration(root / "calibration.json", LEROBOT_CALIBRATION)
    return root


@pytest.fixture(scope="module")
def lerobot_demos(tmp_path_factory):
    """LEROBOT_EPISODES imported once with its front camera -> (the demo file's arrays, what it printed)."""
    import io
    root = write_lerobot(tmp_path_factory.mktemp("lerobot"))
    cfg = Config(use_images=True, cameras="front=0", image_size=32, calibration=str(root / "calibration.json"))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert teleop.import_lerobot(cfg, root, root / "demos.npz") == 2
    return buffer.read_npz(root / "demos.npz"), printed.getvalue()


def kept(q_rad):
    """The tool position of each kept pose of an episode (the FK the importer must use)."""
    return np.array([robot.forward_kinematics(q)[0] for q, _ in q_rad])


class TestLeRobotImport:
    """teleop.py import-lerobot: a LeRobot dataset of an SO-101 follower as a demo file."""

    def test_the_ee_action_is_the_motion_between_kept_frames_per_ee_step_clipped_to_one(self, lerobot_demos):
        saved, _ = lerobot_demos
        expected = np.concatenate([np.clip(np.diff(kept(poses), axis=0) / 0.01, -1, 1) for poses in LEROBOT_EPISODES])
        assert np.allclose(saved["act"][saved["valid"]][:, :3], expected, atol=1e-4)
        assert (np.abs(expected) == 1).any() and (np.abs(expected) < 1).any()   # both clipped and free steps

    def test_the_gripper_command_is_an_opening_change_past_the_threshold_and_a_flip_is_penalised(self, lerobot_demos):
        saved, _ = lerobot_demos
        # openings 0.8 -> 0.3 -> 0.31 (close, stay: 0.01 is noise) and 0.2 -> 0.19 -> 0.6 -> 0.9 (stay, open, open)
        assert saved["act"][saved["valid"]][:, 3].tolist() == [-1, 0, 0, 1, 1]
        # the target starts as found (open, then closed); only a command that changes it is penalised
        assert saved["grasp_penalty"][saved["valid"]].tolist() == pytest.approx([-0.02, 0, 0, -0.02, 0])

    def test_the_state_is_joints_opening_and_the_tool_since_the_episode_start(self, lerobot_demos):
        saved, _ = lerobot_demos
        expected = [np.concatenate([q, [opening], ee - kept(poses)[0]])
                    for poses in LEROBOT_EPISODES for (q, opening), ee in zip(poses, kept(poses))]
        valid, first, last = saved["valid"], [1, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 1]   # of each episode's 3, 4
        assert np.allclose(saved["state"][valid], [s for s, end in zip(expected, last) if not end], atol=1e-5)
        assert np.allclose(saved["next_state"][valid], [s for s, start in zip(expected, first) if not start], atol=1e-5)

    def test_every_episode_is_a_successful_demo_ending_at_its_last_step(self, lerobot_demos):
        saved, _ = lerobot_demos
        valid = saved["valid"]
        assert saved["rew"][valid].tolist() == pytest.approx([-0.05, 10.0, -0.05, -0.05, 10.0])
        assert saved["terminated"][valid].tolist() == [False, True, False, False, True]
        assert not saved["truncated"].any() and saved["intervened"][valid].all()

    def test_each_episode_prints_its_share_of_clipped_steps_and_the_path_the_clip_lost(self, lerobot_demos):
        _, printed = lerobot_demos
        lines = []
        for e, poses in enumerate(LEROBOT_EPISODES):
            moved = np.diff(kept(poses), axis=0) * 1000                          # mm per step
            clipped = np.abs(moved).max(1) > 10                                  # beyond 1 ee_step_m (10 mm)
            path, kept_mm = np.linalg.norm(moved, axis=1).sum(), np.linalg.norm(np.clip(moved, -10, 10), axis=1).sum()
            lines.append(f"episode {e}: {len(moved)} steps, {clipped.mean():.0%} clipped to ±1, "
                         f"{path - kept_mm:.0f} of its {path:.0f} mm EE path lost to the clip")
        assert printed.splitlines() == lines
        assert "50% clipped" in lines[0] and "33% clipped" in lines[1]

    @pytest.mark.parametrize("version", ["v3.0", "v2.1"])
    def test_camera_frames_are_those_at_the_kept_times_resized(self, version, tmp_path):
        root = write_lerobot(tmp_path, version)
        cfg = Config(use_images=True, cameras="front=0", image_size=32, calibration=str(root / "calibration.json"))
        teleop.import_lerobot(cfg, root, tmp_path / "demos.npz")
        front = buffer.read_npz(tmp_path / "demos.npz")["front"]
        assert front.shape == (7, 32, 32, 3)                                     # a slot per kept frame
        # dataset frames 0, 3, 6 of episode 0, then 0, 3, 6, 9 of episode 1, which starts at dataset frame 7
        assert np.abs(front.mean((1, 2, 3)) - [10 + 12 * g for g in (0, 3, 6, 7, 10, 13, 16)]).max() < 4

    def test_without_degrees_minus_100_and_100_are_the_ends_of_the_calibrated_range(self):
        c = LEROBOT_CALIBRATION
        ticks = teleop.lerobot_to_ticks(np.array([[-100, 100, 0, 0, 0, 25.0]]), c, use_degrees=False)[0]
        assert ticks.tolist() == [c["shoulder_pan"].range_min, c["shoulder_lift"].range_max, 2050, 2050, 2047.5, 2250]

    def test_hilserl_trains_from_an_imported_file(self, tmp_path, monkeypatch):
        root = write_lerobot(tmp_path, cameras=())
        monkeypatch.setattr("sys.argv", ["teleop.py", "import-lerobot", str(root), "--demos", str(tmp_path / "demos.npz"),
                                         "--calibration", str(root / "calibration.json")])
        teleop.main()
        small = ["--hidden_dim", "16", "--state_latent_dim", "8", "--batch_size", "16", "--utd_ratio", "1",
                 "--training_starts", "20", "--episode_steps", "30", "--checkpoint_every", "1"]
        monkeypatch.setattr("sys.argv", ["hilserl.py", "--demos", str(tmp_path / "demos.npz"), "--run_dir",
                                         str(tmp_path / "run"), "--privileged_state", "false", "--max_env_steps", "40",
                                         *small])
        hilserl.main()                                                           # the real arm's state: no cube in it
        rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
        assert int(rows[-1]["env_steps"]) >= 40 and np.isfinite(float(rows[-1]["loss/critic"]))

    LEROBOT_REFUSED = [   # (write_lerobot's arguments, extra options, the one line)
        ({"robot_type": "koch_follower"}, [], "robot_type 'koch_follower': only an SO-101 follower's"),
        ({"fps": 25}, [], "fps 25 is not a multiple of --control_hz 10.0"),
        ({}, ["--use_images", "true"], "no video observation.images.wrist (it has observation.images.front)"),
        ({"names": ["a", "b", "c", "d", "e", "f"]}, [], "observation.state's names are ['a', 'b', 'c', 'd', 'e', 'f']"),
        ({}, ["--calibration", "no.json"], "--calibration no.json: no such file; pass the recording arm's"),
    ]

    @pytest.mark.parametrize("dataset, options, says", LEROBOT_REFUSED,
                             ids=["robot_type", "fps", "camera", "names", "calibration"])
    def test_a_dataset_it_cannot_use_is_refused_in_one_line(self, dataset, options, says, tmp_path, monkeypatch):
        root = write_lerobot(tmp_path, **dataset)
        monkeypatch.setattr("sys.argv", ["teleop.py", "import-lerobot", str(root), "--demos", str(tmp_path / "d.npz"),
                                         "--calibration", str(root / "calibration.json"), *options])
        with pytest.raises(SystemExit) as exit_info:
            teleop.main()
        assert str(exit_info.value).startswith("error: ") and says in str(exit_info.value)
        assert "\n" not in str(exit_info.value) and not (tmp_path / "d.npz").exists()

    INFO_REFUSED = [   # meta/info.json as another writer or a damaged file leaves it -> the one line
        ([], "codebase_version 'absent: the file holds list', not v2.x or v3.x"),
        (None, "codebase_version 'absent: the file holds NoneType', not v2.x or v3.x"),
        ({"codebase_version": 3.0}, "codebase_version 3.0, not v2.x or v3.x"),
        ({"features": [["observation.state"]]}, "features [['observation.state']], not a mapping of feature names"),
        ({"fps": "30"}, "fps '30', not a positive number"),
        ({"fps": 0}, "fps 0, not a positive number"),
    ]

    @pytest.mark.parametrize("change, says", INFO_REFUSED, ids=["list", "null", "version", "features", "fps", "fps0"])
    def test_an_info_file_is_checked_field_by_field(self, change, says, tmp_path, monkeypatch):
        root = write_lerobot(tmp_path)
        info = json.loads((root / "meta/info.json").read_text())
        (root / "meta/info.json").write_text(json.dumps({**info, **change} if isinstance(change, dict) else change))
        self.refused(root, tmp_path, monkeypatch, f"{root / 'meta/info.json'}: {says}; is it a LeRobot dataset's")

    DATA_REFUSED = [   # the data files' column -> (its new values, or None to drop it; the one line)
        ("observation.state", lambda s: np.where(np.arange(len(s))[:, None] == 4, np.nan, s),
         "episode 0 at 0.13 s (and 0 more frames): observation.state [nan, nan, nan, nan, nan, nan] is off the "
         "servos' 0-4095 ticks under"),
        ("observation.state", lambda s: np.where(np.arange(len(s))[:, None] >= 7, 1e9, s),
         "episode 1 at 0.00 s (and 9 more frames): observation.state [1000000000.0, 1000000000.0"),
        ("observation.state", lambda s: np.concatenate([s, s[:, :1]], axis=1),
         "observation.state holds (7,) numbers a frame, not the SO-101's 6"),
        ("episode_index", None, "the columns episode_index, timestamp and observation.state do not read: No match "
         "for FieldRef.Name(episode_index)"),
    ]

    @pytest.mark.parametrize("column, values, says", DATA_REFUSED, ids=["nan", "1e9", "width", "no_episode_index"])
    def test_the_data_is_checked_before_anything_is_written(self, column, values, says, tmp_path, monkeypatch):
        import pyarrow as pa
        import pyarrow.parquet as pq
        root = write_lerobot(tmp_path)
        path = next(root.glob("data/*/*.parquet"))
        table = pq.read_table(path)
        if values is None:
            table = table.drop_columns([column])
        else:
            state = np.array(table[column].to_pylist(), float)
            table = table.set_column(table.schema.get_field_index(column), column,
                                     pa.array(values(state).tolist(), pa.list_(pa.float32())))
        pq.write_table(table, path)
        self.refused(root, tmp_path, monkeypatch, f"{root / 'data'}: {says}")

    def test_a_dataset_with_no_episode_longer_than_a_step_writes_nothing(self, tmp_path, monkeypatch):
        root = write_lerobot(tmp_path, fps=30)
        # at 0.25 Hz a control step is 120 frames at 30 fps: every episode (7 and 10 frames) is shorter
        self.refused(root, tmp_path, monkeypatch, f"{root}: no episode is longer than a control step at "
                     f"--control_hz 0.25; nothing written to {tmp_path / 'd.npz'}", "--control_hz", "0.25")

    @staticmethod
    def refused(root, tmp_path, monkeypatch, says, *options):
        monkeypatch.setattr("sys.argv", ["teleop.py", "import-lerobot", str(root), "--demos", str(tmp_path / "d.npz"),
                                         "--calibration", str(root / "calibration.json"), *options])
        with pytest.raises(SystemExit) as exit_info:
            teleop.main()
        assert str(exit_info.value).startswith(f"error: {says}"), str(exit_info.value)
        assert "\n" not in str(exit_info.value) and not (tmp_path / "d.npz").exists()

    def test_without_pyarrow_it_says_what_to_install(self, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "pyarrow", None)                        # import pyarrow now fails
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
        monkeypatch.setattr("sys.argv", ["teleop.py", "import-lerobot", str(tmp_path)])
        with pytest.raises(SystemExit, match=r"^error: import-lerobot needs pyarrow and av: "
                                             r"pip install -r requirements-lerobot.txt$"):
            teleop.main()
