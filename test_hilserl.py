"""Tests: each loss, target and update against values computed here, independently of the code.

The references below are written out in float64 with explicit loops (a Python loop over the
critics, LayerNorm from its definition), so they share parameters with the code under test but
none of its code. Run: `python -m pytest -q test_hilserl.py`.
"""

import copy
import math

import numpy as np
import pytest
import torch

import buffer
import config
import hilserl
from networks import EE_DIM, Agent

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
STATE_DIM = 6


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
            for p in agent.target_parameters():
                p.add_(0.3 * torch.randn_like(p))
    return agent


# --- the actor ---------------------------------------------------------------------------------
def test_tanh_log_prob_matches_change_of_variables():
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


def test_log_prob_stays_finite_when_the_action_saturates():
    cfg = small_cfg()
    agent = make_agent(cfg)
    with torch.no_grad():
        agent.actor.net[-1].bias.copy_(torch.tensor([30.0, -30.0, 30.0, -3.0, -3.0, -3.0]))
        _, log_prob = agent.actor({"state": torch.zeros(4, STATE_DIM)})
    assert torch.isfinite(log_prob).all()


def test_actor_std_is_clipped_to_the_configured_bounds():
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


def run_critic_step(agent, b, next_act, cfg, stubbed=False):
    opts = hilserl.make_optimizers(agent, cfg)
    if stubbed:   # hand-written stand-ins have no parameters to average into
        agent.target_parameters, agent.critic_parameters = lambda: [torch.zeros(1)], lambda: [torch.ones(1)]
    return hilserl.critic_step(agent, opts["critic"], b, next_act, cfg.discount, cfg.tau)


def test_critic_and_grasp_losses_match_float64_reference():
    cfg = small_cfg()
    agent, b = make_agent(cfg), random_batch()
    next_act = torch.rand(8, EE_DIM) * 2 - 1
    ref, critic_loss, grasp_loss = reference_critic_losses(agent, b, next_act, cfg)
    info = run_critic_step(agent, b, next_act, cfg)
    assert math.isclose(info["loss/critic"].item(), critic_loss.item(), rel_tol=1e-5)
    assert math.isclose(info["loss/grasp_critic"].item(), grasp_loss.item(), rel_tol=1e-5)


def test_critic_gradients_match_float64_reference():
    cfg = small_cfg()
    agent, b = make_agent(cfg), random_batch()
    next_act = torch.rand(8, EE_DIM) * 2 - 1
    ref, critic_loss, grasp_loss = reference_critic_losses(agent, b, next_act, cfg)
    (critic_loss + grasp_loss).backward()
    run_critic_step(agent, b, next_act, cfg)
    for mine, theirs in zip(agent.critic_parameters(), ref.critic_parameters()):
        assert torch.allclose(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)


class FixedQ(torch.nn.Module):
    """A target critic whose values are given by hand."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, z, act):
        return self.values


def test_target_is_clipped_min_and_stops_only_at_termination():
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
    info = run_critic_step(agent, b, torch.zeros(4, EE_DIM), cfg, stubbed=True)
    assert math.isclose(info["loss/critic"].item(), ((q - y) ** 2).mean().item(), rel_tol=1e-6)


class FixedGrasp(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values, self.dummy = values, torch.nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return self.values + 0 * self.dummy


def test_grasp_target_is_double_dqn_with_the_penalty():
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
    info = run_critic_step(agent, b, torch.zeros(2, EE_DIM), cfg, stubbed=True)
    assert math.isclose(info["loss/grasp_critic"].item(), ((q_taken - y) ** 2).mean().item(), rel_tol=1e-6)


def test_soft_target_update_moves_targets_by_tau():
    cfg = small_cfg(tau=0.1)
    agent, b = make_agent(cfg), random_batch()
    before = [p.detach().double().clone() for p in agent.target_parameters()]
    run_critic_step(agent, b, torch.zeros(8, EE_DIM), cfg)
    for old, new, online in zip(before, agent.target_parameters(), agent.critic_parameters()):
        expected = (1 - 0.1) * old + 0.1 * online.detach().double()   # online after its update
        assert torch.allclose(new.double(), expected, atol=1e-6)


# --- the actor and temperature update ----------------------------------------------------------
def test_actor_loss_and_gradient_match_float64_reference():
    cfg = small_cfg()
    agent, b = make_agent(cfg), random_batch()
    ref = copy.deepcopy(agent).double()
    opts = hilserl.make_optimizers(agent, cfg)
    torch.manual_seed(3)
    info = hilserl.actor_step(agent, opts["actor"], opts["temperature"], b["obs"], hilserl.target_entropy())
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
    assert math.isclose(info["loss/actor"].item(), loss.item(), rel_tol=1e-4)
    for mine, theirs in zip(agent.actor.parameters(), ref.actor.parameters()):
        assert torch.allclose(mine.grad.double(), theirs.grad, rtol=1e-3, atol=1e-6)
    assert all(p.grad is None for p in agent.critic_parameters())   # the critics are not trained here


@pytest.mark.parametrize("log_std_bias, alpha_should", [(-0.5, "fall"), (-6.0, "rise")])
def test_temperature_gradient_sign(log_std_bias, alpha_should):
    cfg = small_cfg()
    agent = make_agent(cfg)
    with torch.no_grad():
        agent.actor.net[-1].weight.zero_()
        agent.actor.net[-1].bias.copy_(torch.tensor([0.0, 0, 0, log_std_bias, log_std_bias, log_std_bias]))
    opts = hilserl.make_optimizers(agent, cfg)
    alpha_before = agent.log_alpha.exp().item()
    info = hilserl.actor_step(agent, opts["actor"], opts["temperature"], {"state": torch.randn(256, STATE_DIM)}, -2.0)
    # d/dlog_alpha [alpha (H - Htarget)] = alpha (H - Htarget): positive when the policy is too random
    expected_grad = alpha_before * (info["entropy"].item() + 2.0)
    assert math.isclose(agent.log_alpha.grad.item(), expected_grad, rel_tol=1e-5)
    alpha_after = agent.log_alpha.exp().item()
    assert (alpha_after < alpha_before) if alpha_should == "fall" else (alpha_after > alpha_before)


def test_target_entropy_is_minus_half_the_action_dimension():
    assert hilserl.target_entropy() == -2.0    # 3 EE dims + 1 gripper


def test_learn_does_utd_critic_updates_then_one_actor_update():
    cfg = small_cfg(utd_ratio=5)
    agent = make_agent(cfg)
    opts = hilserl.make_optimizers(agent, cfg)
    batches = {k: (torch.stack([v] * 5) if not isinstance(v, dict) else {n: torch.stack([t] * 5) for n, t in v.items()})
               for k, v in random_batch().items()}
    hilserl.learn(agent, opts, batches, cfg)
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])
    assert steps(opts["critic"]) == 5 and steps(opts["actor"]) == 1 and steps(opts["temperature"]) == 1


# --- buffers -----------------------------------------------------------------------------------
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


def test_batch_is_half_demo_half_online():
    demo, online = buffer.ReplayBuffer(50, frame_obs(0), 4), buffer.ReplayBuffer(50, frame_obs(0), 4)
    fill(demo, 20, 5)
    fill(online, 20, 5, start=1000)
    batches = buffer.sample_batches(demo, online, 3, 8, np.random.default_rng(0))
    assert batches["act"].shape == (3, 8, 4)
    assert (batches["act"][:, :4, 0] < 1000).all() and (batches["act"][:, 4:, 0] >= 1000).all()


def test_ring_buffer_wraps_around_and_keeps_next_frames_right():
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


def test_last_step_of_an_episode_keeps_its_own_next_frame():
    buf = buffer.ReplayBuffer(20, frame_obs(0), 4)
    buf.add(frame_obs(0), np.zeros(4), 0.0, frame_obs(1), True, False, False)     # episode ends at frame 1
    buf.add(frame_obs(50), np.zeros(4), 0.0, frame_obs(51), False, False, False)  # next episode starts at 50
    b = buf.gather(np.array([0, 2]))
    assert list(b["next_obs/front"][:, 0, 0, 0]) == [1, 51]
    assert len(buf) == 2 and buf.num_episodes == 1


def test_save_load_round_trip(tmp_path):
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


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
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
    (lambda d: d.update(front=d["front"][:, :2]), "key 'front' is uint8[2, 2, 4, 3], expected uint8[2, 4, 4, 3]"),
    (lambda d: d.update(state=d["state"].astype(np.float64)), "key 'state' is float64"),
])
def test_bad_files_name_the_key_and_what_was_expected(tmp_path, break_it, message):
    buf = buffer.ReplayBuffer(8, frame_obs(0), 4)
    buf.add(frame_obs(0), np.zeros(4), 0.0, frame_obs(1), True, False, False)
    buf.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as f:
        data = dict(f)
    break_it(data)
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        buffer.ReplayBuffer(8, frame_obs(0), 4).load(tmp_path / "bad.npz")


def test_unreadable_or_too_big_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        buffer.ReplayBuffer(8, frame_obs(0), 4).load(tmp_path / "junk.npz")
    big = buffer.ReplayBuffer(30, frame_obs(0), 4)
    fill(big, 20, 5)
    big.save(tmp_path / "big.npz")
    with pytest.raises(ValueError, match="raise --replay_capacity"):
        buffer.ReplayBuffer(8, frame_obs(0), 4).load(tmp_path / "big.npz")


def test_images_are_stored_once_per_frame():
    obs = {"state": np.zeros(12, np.float32), "front": np.zeros((128, 128, 3), np.uint8),
           "wrist": np.zeros((128, 128, 3), np.uint8)}
    buf = buffer.ReplayBuffer(100_000, obs, 4)      # numpy allocates lazily: no memory is touched
    assert sum(a.nbytes for a in buf.arrays.values()) < 10e9
    assert "next_front" not in buf.arrays


# --- config ------------------------------------------------------------------------------------
def test_overrides_are_typed():
    cfg, words = config.parse_overrides(["calibrate", "--utd_ratio", "10", "--discount=0.9", "--bench"])
    assert (cfg.utd_ratio, cfg.discount, cfg.bench, words) == (10, 0.9, True, ["calibrate"])


@pytest.mark.parametrize("args, message", [
    (["--utd_ratoi", "3"], "unknown option --utd_ratoi"),
    (["--utd_ratio", "ten"], "--utd_ratio expects int, got 'ten'"),
    (["--discount"], "--discount needs a value"),
])
def test_bad_options_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.load_config(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_lessons_warnings():
    assert config.warnings_for(config.Config(), num_demo_episodes=20) == []
    bad = config.Config(temperature_init=0.2, utd_ratio=2, reward_step=0.0, reward_success=1.0)
    lines = config.warnings_for(bad, num_demo_episodes=15)
    assert len(lines) == 5 and all("\n" not in line for line in lines)
