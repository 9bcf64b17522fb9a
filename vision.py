"""Vision: what camera frames go through before the networks see them.

Place in the loop: with --encoder resnet10 (the default), every frame a replay buffer stores goes once
through hil-serl's frozen, pretrained ResNet-10, and FrameFeatures keeps its features on the device,
with those of randomly shifted copies (hil-serl's augmentation): the update reads features, never
frames. With --encoder small, hilserl.learn shifts each update's frames (`random_shift`, DrQ) and
networks.SmallCNN learns from them. The weights file is the HF port of hil-serl's ResNet-10.
"""

import math
import os
import re
import sys
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file   # HF's reader of the weights' format

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET10_URL = "https://huggingface.co/lerobot/resnet10/resolve/main/model.safetensors"


# --- the frozen trunk -------------------------------------------------------------------------------
def pad_same(x, kernel, stride, value=0.0):
    """JAX's 'SAME' padding of square maps: output side = ceil(side / stride), the odd pixel at the
    bottom/right."""
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


# --- augmentation and the cache ---------------------------------------------------------------------
def random_shift(frames, pad=4):
    """DrQ's augmentation (Yarats et al. 2021): each image moved by up to `pad` pixels each way, edges
    replicated, the same as padding `pad` (replicate) and cropping back at a random offset. (..., H, W, C)."""
    *_, h, w, c = frames.shape
    x = frames.reshape(-1, h, w, c)                                                # (N, H, W, C)
    shift = torch.randint(-pad, pad + 1, (2, len(x), 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + shift[0]).clamp(0, h - 1)   # (N, H, 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + shift[1]).clamp(0, w - 1)   # (N, 1, W)
    return x[torch.arange(len(x), device=x.device).view(-1, 1, 1), rows, cols].reshape(frames.shape)


def as_stored(features):
    """What FrameFeatures keeps of backbone features (N, C, h, w), never negative (a ReLU ends the
    ResNet): one byte a value, 0..255 times a scale per map -> (uint8 (N, C, h, w), scale (N, 1, 1, 1)).
    Four shifted copies of every frame then fit in 13 GB at the default capacities (float16: 26 GB)."""
    scale = features.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8) / 255
    return (features / scale).round().to(torch.uint8), scale


SHIFTED_COPIES = 4   # --augment with resnet10: features kept of each frame, itself and 3 random shifts


class FrameFeatures:
    """The frozen ResNet-10's features of every frame in a replay buffer, kept on the device, one byte a
    value (as_stored). Row i of `table[camera]` holds those of the frame in the buffer's slot i: the
    backbone runs when a frame is stored, never in an update (~12 TFLOP a control step: 20 updates of
    256 rows, 2 cameras). A row holds `copies` copies: the frame's features, then those of the frame
    randomly shifted (pad 4), of which each batch row reads one (hil-serl random-crops every batch;
    the policy acts on the first)."""

    def __init__(self, buffer, backbone, device, copies=1):
        self.buffer, self.backbone, self.copies, self.device = buffer, backbone, copies, device
        frame_shape = buffer.arrays[buffer.image_keys[0]].shape[1:]                # (H, W, 3)
        shape = backbone(torch.zeros(1, *frame_shape, dtype=torch.uint8, device=device)).shape[1:]   # C, h, w
        self.table = {k: torch.zeros(buffer.capacity, copies, *shape, dtype=torch.uint8, device=device)
                      for k in buffer.image_keys}
        self.scale = {k: torch.zeros(buffer.capacity, copies, 1, 1, 1, device=device)
                      for k in buffer.image_keys}
        self.next_slot = None   # where the frame of the next add's obs already is, while an episode runs
        for start in range(0, buffer.size, 1280):   # frames loaded from files: minutes on a CPU, say how far
            print(f"the ResNet-10's features of {buffer.size} stored frames, {copies} copies each: "
                  f"{start / buffer.size:.0%}", flush=True)
            self.compute(np.arange(start, min(start + 1280, buffer.size)))

    def compute(self, slots, chunk=64):
        for start in range(0, len(slots), chunk):
            s = slots[start:start + chunk]
            for key, table in self.table.items():
                frames = torch.from_numpy(self.buffer.arrays[key][s]).to(self.device)      # (n, H, W, 3)
                frames = frames.unsqueeze(1).repeat(1, self.copies, 1, 1, 1)               # (n, K, H, W, 3)
                frames[:, 1:] = random_shift(frames[:, 1:])
                features, scale = as_stored(self.backbone(frames.flatten(0, 1)))           # (n K, 512, h, w)
                at = torch.as_tensor(s, device=self.device)
                table[at] = features.unflatten(0, frames.shape[:2])                       # (n, K, 512, h, w)
                self.scale[key][at] = scale.unflatten(0, frames.shape[:2])                # (n, K, 1, 1, 1)

    def read(self, key, slots, copy):
        """Features (..., 512, h, w) in float16 of the frames in slots (a tensor), copy `copy` (same
        shape) of each."""
        return (self.table[key][slots, copy] * self.scale[key][slots, copy]).half()

    def add(self, slot):
        """Features of the frames buffer.add wrote at `slot` (next_obs's; obs's too when an episode
        starts). Returns next_obs's unshifted {camera: (1, 512, h, w)}, for the policy's next action."""
        j = (slot + 1) % self.buffer.capacity
        self.compute(np.array([j] if slot == self.next_slot else [slot, j]))
        self.next_slot = j
        at = torch.tensor([j], device=self.device)
        return {key: self.read(key, at, torch.zeros_like(at)) for key in self.table}


# --- pretrained weights: the HF port of hil-serl's ResNet-10, a .safetensors file ----------------
def port_key(name):
    """Our parameter name -> the HF port's (lerobot/resnet10): its convs and norms sit in wrapper modules."""
    name = re.sub(r"^stages\.", "encoder.stages.", name)
    name = re.sub(r"(conv\d|shortcut\.0)\.", r"\1.conv.", name)
    return re.sub(r"(norm\d|embedder\.1|shortcut\.1)\.", r"\1.group_norm.", name)


def load_resnet10(backbone, path):
    """Copy the weights in `path` (the HF port's key layout) into backbone; a clear error if they do
    not fit."""
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
            raise ValueError(f"{path}: key '{key}' has shape {list(theirs[key].shape)}, "
                             f"expected {list(p.shape)}")
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
