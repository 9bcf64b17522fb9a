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
SpatialLearnedEmbeddings -> Linear -> LayerNorm -> tanh) on the pretrained ResNet-10, frozen:
hilserl.py computes its features once per stored frame and the update sees only features (hil-serl's
encoder, cached). The actor still has its own state encoder; with images it also reads the critic
encoder's image features, detached (hil-serl and LeRobot), so only the critic losses train the heads.
"""

import copy
import math
import os
import re
import sys
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file   # HF's reader of the weights' format

from robot import EE_DIM   # the action's layout is the env's: act[:EE_DIM] moves the EE, act[EE_DIM] the gripper

GRIPPER_CLASSES = 3  # the grasp critic's classes: close, stay, open (hil-serl's hybrid agent)


def pick_device(cfg):
    """cfg.device, where "auto" is the GPU when there is one; one line when it is not there."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.split(":")[0] not in ("cpu", "cuda") or (cfg.device != "cpu" and not torch.cuda.is_available()):
        raise SystemExit(f"error: --device {cfg.device!r}: not here; use auto, cpu or cuda (torch sees "
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
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET10_URL = "https://huggingface.co/lerobot/resnet10/resolve/main/model.safetensors"
NUM_SPATIAL_FEATURES = 8  # learned spatial embeddings per feature map (hil-serl)


def pad_same(x, kernel, stride, value=0.0):
    """JAX's 'SAME' padding of square maps: output side = ceil(side / stride), the odd pixel at the bottom/right."""
    side = x.shape[-1]
    total = max(0, (math.ceil(side / stride) - 1) * stride + kernel - side)
    return F.pad(x, (total // 2, total - total // 2) * 2, value=value)


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.stride = stride
        self.conv1, self.norm1 = nn.Conv2d(c_in, c_out, 3, stride, bias=False), nn.GroupNorm(4, c_out)
        self.conv2, self.norm2 = nn.Conv2d(c_out, c_out, 3, 1, bias=False), nn.GroupNorm(4, c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(4, c_out))
                         if c_in != c_out else None)

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(pad_same(x, 3, self.stride))))
        h = self.norm2(self.conv2(pad_same(h, 3, 1)))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet10(nn.Module):
    """hil-serl's frozen trunk: ResNet-10, stage sizes (1, 1, 1, 1), 64 base filters, GroupNorm(4), ReLU.

    uint8 frames (N, H, W, 3) -> (N, 512, H/32, W/32), 4x4 at 128x128. ImageNet normalisation
    happens here, as in hil-serl's encoder (the HF port leaves it to its image processor). The
    stem conv pads 3 on every side, as the HF port does; the other convs pad like JAX ('SAME').
    """

    def __init__(self):
        super().__init__()
        self.embedder = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.GroupNorm(4, 64), nn.ReLU())
        self.stages = nn.ModuleList([BasicBlock(64, 64, 1), BasicBlock(64, 128, 2),
                                     BasicBlock(128, 256, 2), BasicBlock(256, 512, 2)])
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)   # frozen: never trained, no target copy

    @torch.no_grad()
    def forward(self, frames):
        x = (frames.permute(0, 3, 1, 2).float() - self.mean) / self.std           # (N, 3, H, W)
        x = self.embedder(x)                                                      # (N, 64, H/2, W/2)
        x = F.max_pool2d(pad_same(x, 3, 2, -math.inf), 3, 2)                      # (N, 64, H/4, W/4)
        for stage in self.stages:
            x = stage(x)
        return x                                                                  # (N, 512, H/32, W/32)


class SpatialLearnedEmbeddings(nn.Module):
    """hil-serl's pooling: F learned weightings of the (C, H, W) map, each summed over space -> C * F."""

    def __init__(self, channels, height, width, num_features=NUM_SPATIAL_FEATURES):
        super().__init__()
        # lecun_normal over the fan-in H * W * C, as hil-serl's flax kernel (LeRobot's init is 8x larger)
        self.kernel = nn.Parameter(torch.randn(channels, height * width, num_features) / math.sqrt(height * width * channels))

    def forward(self, x):                                                          # (B, C, H, W)
        return torch.einsum("bcp,cpf->bcf", x.flatten(2), self.kernel).flatten(1)  # (B, C * F)


class ImageHead(nn.Module):
    """One camera (hil-serl): ResNet-10 features -> SpatialLearnedEmbeddings(8) -> Linear(256) -> LayerNorm -> tanh.

    Its input is the frozen backbone's features, computed elsewhere once per frame; the backbone is
    passed only to learn their shape. (hil-serl adds Dropout 0.1 after the pooling; we leave it
    out: the agent never switches to eval mode, so acting would be noisy.)
    """

    def __init__(self, frame_shape, latent_dim, backbone):
        super().__init__()
        with torch.no_grad():
            c, h, w = backbone(torch.zeros(1, *frame_shape, dtype=torch.uint8)).shape[1:]
        self.pool = SpatialLearnedEmbeddings(c, h, w)
        self.proj = nn.Sequential(nn.Linear(c * NUM_SPATIAL_FEATURES, latent_dim), nn.LayerNorm(latent_dim), nn.Tanh())
        self.out_dim = latent_dim

    def forward(self, features):                                                   # (B, 512, h, w), float16
        return self.proj(self.pool(features.float()))                             # (B, latent)


# --- pretrained weights: the HF port of hil-serl's ResNet-10, a .safetensors file ----------------
def port_key(name):
    """Our parameter name -> the HF port's (lerobot/resnet10): its convs and norms sit in wrapper modules."""
    name = re.sub(r"^stages\.", "encoder.stages.", name)
    name = re.sub(r"(conv\d|shortcut\.0)\.", r"\1.conv.", name)
    return re.sub(r"(norm\d|embedder\.1|shortcut\.1)\.", r"\1.group_norm.", name)


def load_resnet10(backbone, path):
    """Copy the weights in `path` (the HF port's key layout) into backbone; a clear error if they do not fit."""
    try:
        theirs = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable .safetensors file ({error})") from None
    ours = {port_key(name): p for name, p in backbone.named_parameters()}
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        problem = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise ValueError(f"{path}: {problem}; expected the key layout of lerobot/resnet10 ({RESNET10_URL})")
    for key, p in ours.items():
        if theirs[key].shape != p.shape:
            raise ValueError(f"{path}: key '{key}' has shape {list(theirs[key].shape)}, expected {list(p.shape)}")
        p.data.copy_(theirs[key].float())


def resnet10_weights(cfg):
    """cfg.resnet_weights, or the HF port's file, downloaded once into ~/.cache/hilserl-so101/."""
    if cfg.resnet_weights:
        return cfg.resnet_weights
    path = os.path.join(os.path.expanduser("~"), ".cache", "hilserl-so101", "resnet10.safetensors")
    if not os.path.exists(path):
        print(f"downloading hil-serl's pretrained ResNet-10 (ImageNet-1k, about 20 MB) from {RESNET10_URL}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            urllib.request.urlretrieve(RESNET10_URL, path + ".tmp")
        except OSError as error:
            sys.exit(f"error: cannot download the ResNet-10 weights ({error}); put {RESNET10_URL} at {path} "
                     "or pass --resnet_weights FILE")
        os.replace(path + ".tmp", path)
    return path


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
        self.ln_gains = nn.ParameterList([nn.Parameter(torch.ones(num_critics, 1, hidden_dim)) for _ in range(2)])
        self.ln_shifts = nn.ParameterList([nn.Parameter(torch.zeros(num_critics, 1, hidden_dim)) for _ in range(2)])
        self.activation = nn.Tanh()

    def forward(self, z, act):
        x = torch.cat([z, act], dim=-1)                                     # (B, F + A)
        h = x.expand(len(self.weights[0]), *x.shape)                        # (E, B, F + A): one input, E members
        for layer in range(2):
            h = torch.baddbmm(self.biases[layer], h, self.weights[layer])   # (E, B, H)
            h = self.activation(torch.addcmul(self.ln_shifts[layer], F.layer_norm(h, h.shape[-1:]), self.ln_gains[layer]))
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

    image_shapes: {camera: (H, W, 3)} when observations hold frames; the agent then also holds the
    frozen ResNet-10 (`backbone`), whose features the update reads from hilserl.FrameFeatures.
    """

    def __init__(self, state_dim, cfg, image_shapes=None):
        super().__init__()
        image_shapes = image_shapes or {}
        self.backbone = ResNet10() if image_shapes else None
        self.actor = Actor(state_dim, EE_DIM, cfg, len(image_shapes) * cfg.image_latent_dim)
        self.encoder = Encoder(state_dim, cfg.state_latent_dim, image_shapes, cfg, self.backbone)
        self.critic = CriticEnsemble(cfg.num_critics, self.encoder.out_dim + EE_DIM, cfg.hidden_dim)
        self.grasp_critic = GraspCritic(self.encoder.out_dim, cfg.hidden_dim)
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "critic": copy.deepcopy(self.critic),
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
        if self.backbone is not None:   # frames -> frozen features, rounded as FrameFeatures stores them,
            obs = {**obs, **{name: self.backbone(obs[name]).half() for name in self.encoder.images
                             if obs[name].dtype == torch.uint8}}   # unless the caller has them already
        z = self.encoder(obs)                                                   # (B, F)
        ee, _ = self.actor(obs, self.image_features(z), deterministic)          # (B, 3)
        gripper = self.grasp_critic(z).argmax(-1) - 1                           # class -> {-1, 0, 1}
        return torch.cat([ee, gripper.unsqueeze(-1).to(ee.dtype)], dim=-1)      # (B, 4)
