"""The reward classifier (hil-serl): on a real arm only the human knows when the task is done, so a classifier
trained on frames labelled success or not (`python teleop.py label`) tells the env each step (`--classifier`).

    python classifier.py --frames data/frames.npz --classifier data/classifier.pt
"""

import dataclasses
import os
import pickle

import numpy as np
import torch
import torch.nn as nn

from buffer import read_npz
from config import load_config
from networks import ImageHead, pick_device
from vision import ResNet10, load_resnet10, resnet10_weights


class RewardClassifier(nn.Module):
    """Success logit from frames alone (hil-serl reward_classifier.py): per camera the frozen ResNet-10 and an
    ImageHead, then Linear(256), LayerNorm, ReLU, Linear(1). forward: backbone features, made once a frame."""

    def __init__(self, image_shapes, cfg):
        super().__init__()
        self.backbone = ResNet10()
        self.heads = nn.ModuleDict({name: ImageHead(shape, cfg.image_latent_dim, self.backbone)
                                    for name, shape in image_shapes.items()})
        width = sum(head.out_dim for head in self.heads.values())
        self.net = nn.Sequential(nn.Linear(width, cfg.hidden_dim), nn.LayerNorm(cfg.hidden_dim), nn.ReLU(),
                                 nn.Linear(cfg.hidden_dim, 1))
        self.threshold = cfg.classifier_threshold

    def forward(self, features):                          # {camera: (B, 512, h, w)}
        z = torch.cat([head(features[name]) for name, head in self.heads.items()], dim=-1)
        return self.net(z).squeeze(-1)                    # (B,) logits

    @torch.no_grad()
    def success(self, obs):
        """The env's success signal from one observation's frames: sigmoid(logit) > threshold (hil-serl)."""
        device = self.net[0].weight.device
        features = {name: self.backbone(torch.as_tensor(obs[name], device=device)[None])
                    for name in self.heads}
        return bool(torch.sigmoid(self(features)) > self.threshold)   # SYNC POINT: the env needs a bool


def classifier_data(path):
    """(frames {camera: (N, H, W, 3)}, labels (N,), held_out (N,) bool) from `python teleop.py label`'s file.
    Episodes are held out whole, as neighbouring frames look nearly the same: every fifth of those with
    success frames (at least one of them) and every fifth of the others, so that recall can be measured."""
    data = read_npz(path)
    labels, episodes = data.pop("success", None), data.pop("episode", None)
    if labels is None or episodes is None or not data or any(
            f.shape[1:] != (*f.shape[1:3], 3) or f.dtype != np.uint8 or len(f) != len(labels)
            for f in data.values()):
        raise ValueError(f"{path} holds no labelled frames; record them with python teleop.py label "
                         f"--frames {path}")
    held_out = np.zeros(len(labels), bool)
    for with_success in (True, False):
        group = [e for e in np.unique(episodes) if labels[episodes == e].any() == with_success]
        chosen = group[4::5] or group[-1:]                   # every fifth, at least one,
        if with_success and len(group) < 2:                  # but not the only episode to learn success from
            chosen = []
        held_out |= np.isin(episodes, chosen)
    if not (labels[held_out] == 1).any():
        raise ValueError(f"{path}: fewer than two episodes hold success frames, so none can be held out to "
                         "measure the classifier's recall; label more with python teleop.py label")
    return data, labels.astype(np.float32), held_out


def backbone_features(backbone, frames, device, chunk=256):
    """The frozen backbone once per frame, in chunks: (N, H, W, 3) uint8 -> (N, 512, h, w) on device."""
    return torch.cat([backbone(torch.from_numpy(frames[i:i + chunk]).to(device))
                      for i in range(0, len(frames), chunk)])


def fit_classifier(classifier, features, labels, train_idx, steps, rng, batch_size=256):
    """BCE on half-success batches, Adam 1e-4 (hil-serl; not its random shifts: the features are cached)."""
    positives, negatives = train_idx[labels[train_idx] == 1], train_idx[labels[train_idx] == 0]
    if not len(positives) or not len(negatives):
        raise SystemExit("error: the classifier needs positive (success) and negative frames to train on")
    adam = torch.optim.Adam([p for p in classifier.parameters() if p.requires_grad], lr=1e-4)
    half = batch_size // 2
    y = torch.cat([torch.ones(half), torch.zeros(half)]).to(next(iter(features.values())).device)
    for _ in range(steps):
        idx = np.concatenate([rng.choice(positives, half), rng.choice(negatives, half)])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            classifier({k: f[idx] for k, f in features.items()}), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()


@torch.no_grad()
def precision_recall(classifier, features, labels, idx):
    """Counts over the frames in idx: (successes called success, frames called success, successes).
    Precision is the first over the second, recall the first over the third."""
    logits = classifier({k: f[idx] for k, f in features.items()})
    called = (torch.sigmoid(logits) > classifier.threshold).cpu().numpy()   # SYNC POINT: the scores
    actual = labels[idx] == 1
    return int((called & actual).sum()), int(called.sum()), int(actual.sum())


def train_classifier(cfg):
    if not cfg.classifier or not os.access(os.path.dirname(os.path.abspath(cfg.classifier)), os.W_OK):
        raise ValueError(f"--classifier {cfg.classifier!r}: give a file in a folder that can be written to")
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    frames, labels, held_out = classifier_data(cfg.frames)
    shapes = {k: f.shape[1:] for k, f in frames.items()}
    classifier = RewardClassifier(shapes, cfg).to(device)
    load_resnet10(classifier.backbone, resnet10_weights(cfg))
    features = {k: backbone_features(classifier.backbone, f, device) for k, f in frames.items()}
    train_idx, test_idx = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    fit_classifier(classifier, features, labels, train_idx, cfg.classifier_steps,
                   np.random.default_rng(cfg.seed))
    hits, called, actual = precision_recall(classifier, features, labels, test_idx)
    precision, recall = hits / max(called, 1), hits / max(actual, 1)
    held_out = (f"held out {len(test_idx)} frames of {len(labels)}: precision {precision:.0%} ({hits} of "
                f"{called} called success), recall {recall:.0%} ({hits} of {actual} successes) at threshold "
                f"{cfg.classifier_threshold}")
    print(f"{cfg.frames}: {int(labels.sum())} success frames; {held_out}")
    floor = [float(x) for x in cfg.classifier_floor.split(",")]
    if (precision < floor[0] or recall < floor[1]) and not cfg.classifier_force:
        raise ValueError(f"below --classifier_floor {cfg.classifier_floor} (precision,recall), so not saved: "
                         "it would decide rewards wrongly; label more frames, or pass --classifier_force "
                         "true")
    torch.save({"image_shapes": shapes, "hidden_dim": cfg.hidden_dim,
                "image_latent_dim": cfg.image_latent_dim,
                "held_out": held_out, "classifier": classifier.state_dict()}, cfg.classifier + ".tmp")
    os.replace(cfg.classifier + ".tmp", cfg.classifier)   # atomically
    print(f"wrote {cfg.classifier}; use it with --classifier {cfg.classifier} --use_images true")


def load_classifier(cfg, device):
    """The classifier in cfg.classifier, for an env whose observations hold its cameras' frames."""
    if not cfg.use_images:
        raise ValueError(f"--classifier {cfg.classifier} judges camera frames; add --use_images true")
    try:   # weights only (torch's default): never unpickle what this project did not write
        saved = torch.load(cfg.classifier, map_location=device)
        sizes = {k: saved[k] for k in ("hidden_dim", "image_latent_dim")}   # as it was trained
        classifier = RewardClassifier(saved["image_shapes"], dataclasses.replace(cfg, **sizes)).to(device)
        classifier.load_state_dict(saved["classifier"])
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):
        raise ValueError(f"--classifier {cfg.classifier}: "
                         "not a classifier that python classifier.py wrote") from None
    cameras = {item.split("=")[0]: (cfg.image_size, cfg.image_size, 3) for item in cfg.cameras.split(",")}
    if any(cameras.get(name) != tuple(shape) for name, shape in saved["image_shapes"].items()):
        raise ValueError(f"--classifier {cfg.classifier}: trained on frames {saved['image_shapes']}, these "
                         f"settings make {cameras}; train it again on frames labelled with these settings")
    print(f"--classifier {cfg.classifier}: {saved.get('held_out', 'no held-out figures (an older file)')}")
    return classifier


if __name__ == "__main__":
    cfg, words = load_config()
    if words:
        raise SystemExit("usage: python classifier.py --frames data/frames.npz "
                         "--classifier data/classifier.pt")
    try:
        train_classifier(cfg)
    except ValueError as error:   # a file that is not what it should be, or weights that do not fit
        raise SystemExit(f"error: {error}") from None
