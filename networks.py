"""Networks: the state encoder, the tanh-Gaussian actor, the critic ensemble, the grasp critic.

Place in the loop: the actor picks the arm's EE motion each control step; the critics and the
grasp critic are what the SAC/RLPD update in hilserl.py trains. Every MLP is HIL-SERL's:
hidden layers Linear -> LayerNorm -> tanh, 256 wide, two of them (hil-serl launcher).

Shapes (B = batch, E = critics in the ensemble, A = 3 continuous action dims, F = features):
  obs["state"]                      (B, S)  float32
  obs[camera]                       (B, H, W, 3) uint8 frames, or (B, 512, h, w) ResNet-10 features
  Encoder(obs) -> z                 (B, F)  what the critics and the grasp critic see
  Actor(obs, z_images) -> act, log_prob   (B, A), (B,)
  CriticEnsemble(z, act) -> q       (E, B)
  GraspCritic(z) -> q               (B, 3)  gripper classes 0 close, 1 stay, 2 open (hil-serl)

Who trains what: the critic losses train the encoder, the critics and the grasp critic; the
actor has its own small state encoder, so it is fixed while the critics learn, and the critic
target's next actions for a whole control step can be drawn in one batched call.
With cameras, each camera adds an image head to the `Encoder` (hil-serl's
SpatialLearnedEmbeddings -> Linear -> LayerNorm -> tanh) on one of two trunks (--encoder):
  resnet10  hil-serl's pretrained ResNet-10, frozen: vision.FrameFeatures computes its features
            once per stored frame (and of shifted copies, hil-serl's augmentation) and the update
            sees only features
  small     a small CNN trained end to end by the critic losses, each update's frames randomly
            shifted (DrQ); it needs no weights file
The actor reads the critic encoder's image features, detached (hil-serl and LeRobot), so only the
critic losses train the image heads and the small CNN.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from robot import EE_DIM   # the env's action layout: act[:EE_DIM] moves the EE, act[EE_DIM] the gripper
from vision import ResNet10, as_stored

GRIPPER_CLASSES = 3  # the grasp critic's classes: close, stay, open (hil-serl's hybrid agent)


# What each device can do, in one place: Adam's fused kernel (every parameter in one pass; torch has it for
# CUDA, the CPU and, from torch 2.4, Apple's mps), --compile (fast.py's torch.compile, timed on CUDA and the
# CPU; mps runs the eager update), CUDA graphs (CUDA's alone). uint8 frames and features work on all three.
DEVICE_CAN = {"cuda": {"fused_adam", "compile", "cuda_graphs"}, "cpu": {"fused_adam", "compile"},
              "mps": {"fused_adam"}}


def pick_device(cfg):
    """cfg.device; "auto" is the CUDA GPU, else Apple's GPU (mps), else the CPU; one line if it is missing."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if cfg.device == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    kind = cfg.device.split(":")[0]
    if kind == "mps" and not mps:
        raise SystemExit("error: --device mps: mps is not available here (it needs Apple Silicon, macOS 12.3 "
                         "or later and torch's macOS build); use auto or cpu")
    if kind not in DEVICE_CAN or (kind == "cuda" and not cuda):
        raise SystemExit(f"error: --device {cfg.device!r}: not here; use auto, cpu, cuda or mps (torch sees "
                         f"{torch.cuda.device_count()} CUDA GPUs)")
    return torch.device(cfg.device)


def mlp(in_dim, hidden_dim, out_dim):
    """Two hidden Linear -> LayerNorm -> tanh layers, then a linear output (hil-serl)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.Tanh(),
        nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.Tanh(),
        nn.Linear(hidden_dim, out_dim))


class Encoder(nn.Module):
    """Observation -> features: state through Linear -> LayerNorm -> tanh (hil-serl's proprio encoder),
    then each camera's image features (ImageHead), concatenated in that order: z[..., :state_dim]
    is the state's part, the rest the cameras'.
    """

    def __init__(self, state_dim, latent_dim, image_shapes=None, cfg=None, backbone=None):
        super().__init__()
        self.state = nn.Sequential(nn.Linear(state_dim, latent_dim), nn.LayerNorm(latent_dim), nn.Tanh())
        self.images = nn.ModuleDict({name: ImageHead(shape, cfg.image_latent_dim, backbone)
                                     for name, shape in (image_shapes or {}).items()})
        self.state_dim = latent_dim
        self.out_dim = latent_dim + sum(head.out_dim for head in self.images.values())

    def forward(self, obs):
        z = self.state(obs["state"])                                         # (B, L)
        if not self.images:
            return z
        return torch.cat([z, *(head(obs[name]) for name, head in self.images.items())], dim=-1)   # (B, F)


# --- images -------------------------------------------------------------------------------------
NUM_SPATIAL_FEATURES = 8  # learned spatial embeddings per feature map (hil-serl)


class SmallCNN(nn.Module):
    """`--encoder small`: uint8 frames (N, H, W, 3) -> (N, 32, H/8, W/8), trained end to end.

    DrQ's encoder (Yarats et al. 2021) is four 3x3 convs of 32 filters, the first with stride 2; ours
    strides three of them, which makes it about 10x cheaper (serl_launcher too keeps small encoders
    beside its ResNets)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())

    def forward(self, frames):
        return self.net(frames.permute(0, 3, 1, 2).float() / 255 - 0.5)          # (N, 32, H/8, W/8)


class SpatialLearnedEmbeddings(nn.Module):
    """hil-serl's pooling: F learned weightings of the (C, H, W) map, each summed over space -> C * F."""

    def __init__(self, channels, height, width, num_features=NUM_SPATIAL_FEATURES):
        super().__init__()
        # lecun_normal over the fan-in H * W * C, as hil-serl's flax kernel (LeRobot's init is 8x larger)
        fan_in = height * width * channels
        self.kernel = nn.Parameter(torch.randn(channels, height * width, num_features) / math.sqrt(fan_in))

    def forward(self, x):                                                          # (B, C, H, W)
        return torch.einsum("bcp,cpf->bcf", x.flatten(2), self.kernel).flatten(1)  # (B, C * F)


class ImageHead(nn.Module):
    """One camera (hil-serl): trunk -> SpatialLearnedEmbeddings(8) -> Linear(256) -> LayerNorm -> tanh.

    With a backbone (the frozen ResNet-10) the head's input is its features, computed elsewhere once
    per frame; the backbone is passed only to learn their shape. Without, a SmallCNN trained with the
    head turns frames into features. (hil-serl adds Dropout 0.1 after the pooling; we leave it
    out: the agent never switches to eval mode, so acting would be noisy.)
    """

    def __init__(self, frame_shape, latent_dim, backbone=None):
        super().__init__()
        self.cnn = SmallCNN() if backbone is None else None
        with torch.no_grad():
            c, h, w = (self.cnn or backbone)(torch.zeros(1, *frame_shape, dtype=torch.uint8)).shape[1:]
        self.pool = SpatialLearnedEmbeddings(c, h, w)
        self.proj = nn.Sequential(
            nn.Linear(c * NUM_SPATIAL_FEATURES, latent_dim), nn.LayerNorm(latent_dim), nn.Tanh())
        self.out_dim = latent_dim

    def forward(self, x):          # the small CNN's: frames (B, H, W, 3) uint8; else (B, 512, h, w) features
        x = self.cnn(x) if self.cnn is not None else x.float()                    # (B, C, h, w)
        return self.proj(self.pool(x))                                             # (B, latent)


class Actor(nn.Module):
    """Tanh-squashed diagonal Gaussian policy over EE deltas (SAC, Haarnoja et al. 2018).

    image_dim > 0: the actor also reads z_images, the critic encoder's image features, detached.
    """

    def __init__(self, state_dim, act_dim, cfg, image_dim=0):
        super().__init__()
        self.encoder = Encoder(state_dim, cfg.state_latent_dim)
        self.net = mlp(self.encoder.out_dim + image_dim, cfg.hidden_dim, 2 * act_dim)
        self.log_std_min = math.log(cfg.actor_std_min)
        self.log_std_max = math.log(cfg.actor_std_max)

    def forward(self, obs, z_images=None, deterministic=False):
        h = self.encoder(obs)                                                  # (B, L)
        if z_images is not None:
            h = torch.cat([h, z_images.detach()], dim=-1)                      # (B, L + F_img)
        mean, log_std = self.net(h).chunk(2, dim=-1)                           # (B, A) each
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
        ln_shape = (num_critics, 1, hidden_dim)   # each member's own LayerNorm gain and shift
        self.ln_gains = nn.ParameterList([nn.Parameter(torch.ones(ln_shape)) for _ in range(2)])
        self.ln_shifts = nn.ParameterList([nn.Parameter(torch.zeros(ln_shape)) for _ in range(2)])
        self.activation = nn.Tanh()

    def forward(self, z, act):
        x = torch.cat([z, act], dim=-1)                                     # (B, F + A)
        h = x.expand(len(self.weights[0]), *x.shape)                        # (E, B, F + A): E views of one x
        for layer in range(2):
            h = torch.baddbmm(self.biases[layer], h, self.weights[layer])   # (E, B, H)
            h = F.layer_norm(h, h.shape[-1:])
            h = self.activation(torch.addcmul(self.ln_shifts[layer], h, self.ln_gains[layer]))
        return torch.baddbmm(self.biases[2], h, self.weights[2]).squeeze(-1)   # (E, B)


class GraspCritic(nn.Module):
    """Q-values of the three gripper commands, for Double DQN (HIL-SERL's hybrid agent)."""

    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, GRIPPER_CLASSES)

    def forward(self, z):
        return self.net(z)  # (B, 3)


class Agent(nn.Module):
    """Everything the update trains, plus the polyak-averaged target copies (hil-serl averages all).

    image_shapes: {camera: (H, W, 3)} when observations hold frames. With --encoder resnet10 the agent
    also holds the frozen ResNet-10 (`backbone`), whose features the update reads from vision.FrameFeatures.
    """

    def __init__(self, state_dim, cfg, image_shapes=None):
        super().__init__()
        image_shapes = image_shapes or {}
        self.image_encoder = cfg.encoder if image_shapes else None   # a checkpoint refuses the other
        self.backbone = ResNet10() if self.image_encoder == "resnet10" else None
        self.actor = Actor(state_dim, EE_DIM, cfg, len(image_shapes) * cfg.image_latent_dim)
        self.encoder = Encoder(state_dim, cfg.state_latent_dim, image_shapes, cfg, self.backbone)
        self.critic = CriticEnsemble(cfg.num_critics, self.encoder.out_dim + EE_DIM, cfg.hidden_dim)
        self.grasp_critic = GraspCritic(self.encoder.out_dim, cfg.hidden_dim)
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder),
                                     "critic": copy.deepcopy(self.critic),
                                     "grasp_critic": copy.deepcopy(self.grasp_critic)}).requires_grad_(False)
        # alpha = exp(log_alpha) stays positive; initialised to temperature_init (hil-serl: 0.01)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))
        # {name: parameter} trained by the critic losses, and their target copies in the same order
        self.critic_params = {name: p for name, p in self.named_parameters()
                              if name.split(".")[0] in ("encoder", "critic", "grasp_critic")}
        self.target_params = list(self.target.parameters())

    def image_features(self, z):
        """The camera part of the critic encoder's features, which the actor reads; None without cameras."""
        return z[..., self.encoder.state_dim:] if self.encoder.images else None

    @torch.no_grad()
    def act(self, obs, deterministic=False):
        """One action for the robot: EE deltas from the actor, the gripper from the grasp critic's argmax."""
        for name in self.encoder.images if self.backbone is not None else ():   # frames -> frozen features,
            if obs[name].dtype == torch.uint8:                     # rounded as FrameFeatures stores them,
                q, scale = as_stored(self.backbone(obs[name]))     # unless the caller has them already
                obs = {**obs, name: (q * scale).half()}
        z = self.encoder(obs)                                                   # (B, F)
        ee, _ = self.actor(obs, self.image_features(z), deterministic)          # (B, 3)
        gripper = self.grasp_critic(z).argmax(-1) - 1                           # class -> {-1, 0, 1}
        return torch.cat([ee, gripper.unsqueeze(-1).to(ee.dtype)], dim=-1)      # (B, 4)
