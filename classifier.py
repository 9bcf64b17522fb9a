"""The reward classifier's training: labelled camera frames -> a success classifier (hil-serl).

Place in the loop: on a real arm nothing but the human knows when the task is done. hil-serl
trains a classifier on frames labelled success or not (recorded by `python teleop.py label`),
and the env then asks it after every step (`--classifier`). The network is networks.py's
RewardClassifier; this file trains, tests and loads it.

    python classifier.py --frames data/frames.npz --classifier data/classifier.pt
"""

import numpy as np
import torch

from config import load_config
from networks import RewardClassifier, load_resnet10, pick_device, resnet10_weights


def classifier_data(path):
    """(frames {camera: (N, H, W, 3)}, labels (N,), held_out (N,) bool) from `python teleop.py label`'s file.

    Every fifth episode is held out whole, as neighbouring frames look nearly the same.
    """
    try:
        data = np.load(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path}: not a readable .npz file ({error})") from None
    with data:
        if "success" not in data.files or "episode" not in data.files:
            raise SystemExit(f"error: {path} holds no labelled frames; record them with python teleop.py label --frames {path}")
        frames = {k: data[k] for k in data.files if k not in ("success", "episode")}
        return frames, data["success"].astype(np.float32), data["episode"] % 5 == 4


def backbone_features(backbone, frames, device, chunk=256):
    """The frozen backbone once per frame, in chunks: (N, H, W, 3) uint8 -> (N, 512, h, w) on device."""
    return torch.cat([backbone(torch.from_numpy(frames[i:i + chunk]).to(device)) for i in range(0, len(frames), chunk)])


def fit_classifier(classifier, features, labels, train_idx, steps, rng, batch_size=256):
    """BCE on balanced batches, half positive and half negative frames, Adam 1e-4 (hil-serl).

    hil-serl also shifts the frames randomly; we train on cached features, so we do not.
    """
    positives, negatives = train_idx[labels[train_idx] == 1], train_idx[labels[train_idx] == 0]
    if not len(positives) or not len(negatives):
        raise SystemExit("error: the classifier needs positive (success) and negative frames to train on")
    adam = torch.optim.Adam([p for p in classifier.parameters() if p.requires_grad], lr=1e-4)
    half = batch_size // 2
    y = torch.cat([torch.ones(half), torch.zeros(half)]).to(next(iter(features.values())).device)
    for _ in range(steps):
        idx = np.concatenate([rng.choice(positives, half), rng.choice(negatives, half)])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier({k: f[idx] for k, f in features.items()}), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()


@torch.no_grad()
def precision_recall(classifier, features, labels, idx):
    """Of the frames in idx called success, the share that are; of the successes, the share found."""
    called = (torch.sigmoid(classifier({k: f[idx] for k, f in features.items()})) > classifier.threshold).cpu().numpy()
    actual = labels[idx] == 1                                                    # SYNC POINT above: the scores
    hits = (called & actual).sum()
    return hits / max(called.sum(), 1), hits / max(actual.sum(), 1)


def train_classifier(cfg):
    if not cfg.classifier:
        raise SystemExit("error: give --classifier PATH, the file to write the classifier to")
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    frames, labels, held_out = classifier_data(cfg.frames)
    shapes = {k: f.shape[1:] for k, f in frames.items()}
    classifier = RewardClassifier(shapes, cfg).to(device)
    load_resnet10(classifier.backbone, resnet10_weights(cfg))
    features = {k: backbone_features(classifier.backbone, f, device) for k, f in frames.items()}
    train_idx, test_idx = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    if not len(test_idx):
        raise SystemExit(f"error: {cfg.frames} has fewer than 5 episodes; every fifth is held out to test on")
    fit_classifier(classifier, features, labels, train_idx, cfg.classifier_steps, np.random.default_rng(cfg.seed))
    precision, recall = precision_recall(classifier, features, labels, test_idx)
    print(f"{cfg.frames}: {int(labels.sum())} success frames of {len(labels)}; held out "
          f"{len(test_idx)} frames ({int(labels[test_idx].sum())} successes): precision {precision:.0%}, "
          f"recall {recall:.0%} at threshold {cfg.classifier_threshold}")
    torch.save({"image_shapes": shapes, "classifier": classifier.state_dict()}, cfg.classifier)
    print(f"wrote {cfg.classifier}; use it with --classifier {cfg.classifier} --use_images true")


def load_classifier(cfg, device):
    """The classifier in cfg.classifier, for an env whose observations hold its cameras' frames."""
    if not cfg.use_images:
        raise SystemExit(f"error: --classifier {cfg.classifier} judges camera frames; add --use_images true")
    saved = torch.load(cfg.classifier, map_location=device)
    classifier = RewardClassifier(saved["image_shapes"], cfg).to(device)
    classifier.load_state_dict(saved["classifier"])
    return classifier


if __name__ == "__main__":
    cfg, words = load_config()
    if words:
        raise SystemExit("usage: python classifier.py --frames data/frames.npz --classifier data/classifier.pt")
    train_classifier(cfg)
