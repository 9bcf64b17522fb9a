"""Networks: the state encoder, the tanh-Gaussian actor, the critic ensemble, the grasp critic.

Place in the loop: the actor picks the arm's EE motion each control step; the critics and the
grasp critic are what the SAC/RLPD update in hilserl.py trains. Every MLP is HIL-SERL's:
hidden layers Linear -> LayerNorm -> tanh, 256 wide, two of them (hil-serl launcher).

Shapes (B = batch, E = critics in the ensemble, A = 3 continuous action dims, F = features):
  obs["state"]                      (B, S)  float32
  Encoder(obs) -> z                 (B, F)  what the critics and the grasp critic see
  Actor(obs) -> act, log_prob       (B, A), (B,)
  CriticEnsemble(z, act) -> q       (E, B)
  GraspCritic(z) -> q               (B, 3)  gripper classes 0 close, 1 stay, 2 open (hil-serl)

Who trains what: the critic losses train the encoder, the critics and the grasp critic; the
actor has its own small state encoder, so it is fixed while the critics learn, and the critic
target's next actions for a whole control step can be drawn in one batched call.
Camera frames: the `Encoder` is where image features join the state features.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EE_DIM = 3           # continuous action: EE position delta x, y, z
GRIPPER_CLASSES = 3  # close, stay, open (hil-serl's hybrid agent)


def tanh(x):
    """tanh(x) = 2 sigmoid(2x) - 1: the same function, but torch's CPU tanh kernel is about 3x slower
    than its sigmoid here, and tanh is a fifth of an update's time on a CPU."""
    return torch.sigmoid(2 * x) * 2 - 1


class Tanh(nn.Module):
    def forward(self, x):
        return tanh(x)


def mlp(in_dim, hidden_dim, out_dim):
    """Two hidden Linear -> LayerNorm -> tanh layers, then a linear output (hil-serl)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), Tanh(),
        nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), Tanh(),
        nn.Linear(hidden_dim, out_dim))


class Encoder(nn.Module):
    """Observation -> features: state through Linear -> LayerNorm -> tanh (hil-serl's proprio encoder).

    Image encoders, when observations hold camera frames, add their features here: each
    camera's features are concatenated after the state's.
    """

    def __init__(self, state_dim, latent_dim):
        super().__init__()
        self.state = nn.Sequential(nn.Linear(state_dim, latent_dim), nn.LayerNorm(latent_dim), Tanh())
        self.out_dim = latent_dim

    def forward(self, obs):
        return self.state(obs["state"])  # (B, F)


class Actor(nn.Module):
    """Tanh-squashed diagonal Gaussian policy over EE deltas (SAC, Haarnoja et al. 2018)."""

    def __init__(self, state_dim, act_dim, cfg):
        super().__init__()
        self.encoder = Encoder(state_dim, cfg.state_latent_dim)
        self.net = mlp(self.encoder.out_dim, cfg.hidden_dim, 2 * act_dim)
        self.log_std_min = math.log(cfg.actor_std_min)
        self.log_std_max = math.log(cfg.actor_std_max)

    def forward(self, obs, deterministic=False):
        mean, log_std = self.net(self.encoder(obs)).chunk(2, dim=-1)           # (B, A) each
        log_std = log_std.clamp(self.log_std_min, self.log_std_max)  # std = clip(exp(.), 1e-5, 5) (hil-serl)
        if deterministic:
            return torch.tanh(mean), None
        noise = torch.randn_like(mean)
        u = mean + log_std.exp() * noise                                       # reparameterised sample
        # PAPER: SAC (Haarnoja et al. 2018) eq. 26, log pi(a|s) = log N(u) - sum log(1 - tanh(u)^2);
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) is the same quantity without overflow.
        log_normal = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))
        return torch.tanh(u), (log_normal - log_det).sum(-1)                   # (B, A), (B,)


class CriticEnsemble(nn.Module):
    """E critics Q(z, a) computed as one batched matmul per layer, not a Python loop.

    Weights are stacked (E, in, out); LayerNorm is normalised per member and keeps a per-member
    gain and shift, like RLPD's vmapped ensemble.
    """

    def __init__(self, num_critics, in_dim, hidden_dim):
        super().__init__()
        dims = [in_dim, hidden_dim, hidden_dim, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(num_critics, d_in, d_out)
            for member in w:                        # xavier_uniform per member (hil-serl)
                nn.init.xavier_uniform_(member)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_critics, 1, d_out)))
        self.ln_gains = nn.ParameterList([nn.Parameter(torch.ones(num_critics, 1, hidden_dim)) for _ in range(2)])
        self.ln_shifts = nn.ParameterList([nn.Parameter(torch.zeros(num_critics, 1, hidden_dim)) for _ in range(2)])

    def forward(self, z, act):
        x = torch.cat([z, act], dim=-1)                                     # (B, F + A)
        h = torch.matmul(x, self.weights[0]) + self.biases[0]               # (E, B, H): one input, E members
        for layer in range(2):
            h = tanh(torch.addcmul(self.ln_shifts[layer], F.layer_norm(h, h.shape[-1:]), self.ln_gains[layer]))
            h = torch.baddbmm(self.biases[layer + 1], h, self.weights[layer + 1])   # (E, B, H) then (E, B, 1)
        return h.squeeze(-1)                                                # (E, B)


class GraspCritic(nn.Module):
    """Q-values of the three gripper commands, for Double DQN (HIL-SERL's hybrid agent)."""

    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, GRIPPER_CLASSES)

    def forward(self, z):
        return self.net(z)  # (B, 3)


class Agent(nn.Module):
    """Everything the update trains, plus the polyak-averaged target copies (hil-serl averages all)."""

    def __init__(self, state_dim, cfg):
        super().__init__()
        self.actor = Actor(state_dim, EE_DIM, cfg)
        self.encoder = Encoder(state_dim, cfg.state_latent_dim)
        self.critic = CriticEnsemble(cfg.num_critics, self.encoder.out_dim + EE_DIM, cfg.hidden_dim)
        self.grasp_critic = GraspCritic(self.encoder.out_dim, cfg.hidden_dim)
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "critic": copy.deepcopy(self.critic),
                                     "grasp_critic": copy.deepcopy(self.grasp_critic)}).requires_grad_(False)
        # alpha = exp(log_alpha) stays positive; initialised to temperature_init (hil-serl: 0.01)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))

    def critic_parameters(self):
        """Trained by the critic loss, in the same order as `target_parameters`."""
        return [*self.encoder.parameters(), *self.critic.parameters(), *self.grasp_critic.parameters()]

    def target_parameters(self):
        t = self.target
        return [*t["encoder"].parameters(), *t["critic"].parameters(), *t["grasp_critic"].parameters()]

    @torch.no_grad()
    def act(self, obs, deterministic=False):
        """One action for the robot: EE deltas from the actor, the gripper from the grasp critic's argmax."""
        ee, _ = self.actor(obs, deterministic)                                  # (B, 3)
        gripper = self.grasp_critic(self.encoder(obs)).argmax(-1) - 1           # class -> {-1, 0, 1}
        return torch.cat([ee, gripper.unsqueeze(-1).to(ee.dtype)], dim=-1)      # (B, 4)
