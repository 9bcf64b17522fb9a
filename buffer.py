"""Replay buffers: preallocated numpy rings of transitions, the 50/50 batch, atomic .npz files.

Place in the loop: every control step adds one transition to the online buffer, and to the demo
buffer too when the human acted (hil-serl). Before the updates, `sample_batches` draws every
batch of the control step at once, half from the demos and half from the online data (RLPD).

Layout. A transition is (obs, act, rew, next_obs, terminated, truncated, intervened,
grasp_penalty). Vectors such as obs["state"] are stored twice, as obs and next_obs. Camera frames
are big (128x128x3 bytes each), so they are stored once per frame: slot i holds the frame of
obs_i, and next_obs_i's frame is the one in slot i+1. When an episode ends, its last frame
still needs a home, so slot i+1 keeps it and is marked invalid (never sampled); the next episode
starts at i+2. That costs one slot per episode, and the last step of an episode never
bootstraps from the first frame of the next one.
"""

import contextlib
import fcntl
import os
import pathlib
import tempfile
import zipfile

import numpy as np


class ReplayBuffer:
    def __init__(self, capacity, example_obs, act_dim):
        assert capacity >= 2, "a buffer needs at least two slots"
        self.capacity = capacity
        self.image_keys = [k for k, v in example_obs.items() if v.dtype == np.uint8]
        self.vector_keys = [k for k, v in example_obs.items() if v.dtype != np.uint8]
        self.arrays = {}
        for key in self.image_keys:                          # once per frame (see the docstring)
            self.arrays[key] = np.zeros((capacity, *example_obs[key].shape), np.uint8)
        for key in self.vector_keys:
            shape = example_obs[key].shape
            self.arrays[key] = np.zeros((capacity, *shape), np.float32)
            self.arrays["next_" + key] = np.zeros((capacity, *shape), np.float32)
        self.arrays["act"] = np.zeros((capacity, act_dim), np.float32)
        for key in ("rew", "grasp_penalty"):
            self.arrays[key] = np.zeros(capacity, np.float32)
        for key in ("terminated", "truncated", "intervened", "valid"):
            self.arrays[key] = np.zeros(capacity, bool)
        self.cursor = 0          # the slot the next transition goes to
        self.size = 0            # slots written so far, up to capacity (valid or not)
        self.frame_pending = False   # slot `cursor` holds the last transition's next frame

    def __len__(self):
        """Number of transitions that can be sampled."""
        return int(self.arrays["valid"].sum())

    @property
    def num_episodes(self):
        """Episodes that ended in the buffer (an episode still running is not counted)."""
        a = self.arrays
        return int((a["valid"] & (a["terminated"] | a["truncated"])).sum())

    def add(self, obs, act, rew, next_obs, terminated, truncated, intervened, grasp_penalty=0.0):
        """Store one transition; returns its slot."""
        a = self.arrays
        if self.frame_pending and any(not np.array_equal(a[k][self.cursor], obs[k]) for k in self.image_keys):
            # obs does not follow the last transition (the demo buffer gets only the human's steps,
            # with gaps between interventions): skip a slot so that transition keeps its next frame
            self.cursor = (self.cursor + 1) % self.capacity
        i, j = self.cursor, (self.cursor + 1) % self.capacity
        for key in self.image_keys:
            a[key][i] = obs[key]
            a[key][j] = next_obs[key]                    # becomes obs of slot j on the next add
        for key in self.vector_keys:
            a[key][i] = obs[key]
            a["next_" + key][i] = next_obs[key]
        a["act"][i], a["rew"][i], a["grasp_penalty"][i] = act, rew, grasp_penalty
        a["terminated"][i], a["truncated"][i], a["intervened"][i] = terminated, truncated, intervened
        a["valid"][i] = True
        a["valid"][j] = False                            # slot j now holds only a frame
        episode_over = terminated or truncated
        self.cursor = (j + 1) % self.capacity if episode_over else j
        self.size = self.capacity if j == 0 or self.size == self.capacity else max(self.size, j + 1)
        self.frame_pending = not episode_over
        return i

    def sample_indices(self, n, rng):
        """n slot indices drawn uniformly from the valid transitions."""
        valid = np.flatnonzero(self.arrays["valid"])
        if len(valid) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return valid[rng.integers(0, len(valid), size=n)]

    def gather(self, idx, frames=True):
        """The transitions at slot indices idx, as a dict of arrays with idx's shape in front.

        frames=False leaves the camera frames out and gives their slots, batch["slot"] = idx (the
        frame of next_obs is in slot idx + 1), for features kept elsewhere (hilserl.FrameFeatures).
        """
        a = self.arrays
        keys = ("act", "rew", "grasp_penalty", "terminated", "truncated", "intervened")
        batch = {k: a[k][idx] for k in keys}
        if not frames:
            batch["slot"] = idx
        for key in self.image_keys if frames else ():
            batch["obs/" + key] = a[key][idx]
            batch["next_obs/" + key] = a[key][(idx + 1) % self.capacity]
        for key in self.vector_keys:
            batch["obs/" + key] = a[key][idx]
            batch["next_obs/" + key] = a["next_" + key][idx]
        return batch

    # --- files -------------------------------------------------------------------------------
    def save(self, path, extra=None):
        """Write the filled slots to `path` atomically, plus `extra` arrays (a run folder's log row)."""
        full = self.size == self.capacity
        order = (np.arange(self.size) + (self.cursor + 1 if full else 0)) % self.capacity   # oldest first
        arrays = {k: v[order] for k, v in self.arrays.items()}
        if self.size:
            arrays["valid"][-1] = False  # its next frame, if any, is not in the file
        save_npz(path, {**arrays, **(extra or {})})

    def read(self, path):
        """The arrays of a `save` file, every key, shape, dtype and value checked against this buffer's."""
        loaded = read_npz(path)
        odd = sorted(set(self.arrays) ^ {k for k in loaded if not k.startswith("log/")})  # log/: run log rows
        if odd:
            raise ValueError(f"{path}: {'unexpected' if odd[0] in loaded else 'missing'} key '{odd[0]}'; "
                             f"expected keys {sorted(self.arrays)} (recorded with other cameras or state?)")
        n = len(loaded["valid"])
        for key, mine in self.arrays.items():
            theirs = loaded[key]
            if theirs.shape[1:] != mine.shape[1:] or theirs.dtype != mine.dtype or len(theirs) != n:
                raise ValueError(f"{path}: key '{key}' is {theirs.dtype}{list(theirs.shape)}, expected "
                                 f"{mine.dtype}{[n, *mine.shape[1:]]} (recorded with other cameras, "
                                 "image size or state?)")
            if theirs.dtype == np.float32 and not np.isfinite(theirs).all():   # NaN would poison every update
                raise ValueError(f"{path}: key '{key}' holds NaN or infinite values; record it again or "
                                 "restore a copy")
        return loaded

    def load(self, path):
        """Replace the contents with a file written by `save`."""
        loaded = self.read(path)
        n = len(loaded["valid"])
        if n > self.capacity:
            raise ValueError(f"{path}: holds {n} slots but the buffer has {self.capacity}; "
                             "raise --replay_capacity or --demo_capacity")
        for key in self.arrays:
            self.arrays[key][:n] = loaded[key]
        self.arrays["valid"][n:] = False
        self.size, self.cursor, self.frame_pending = n, n % self.capacity, False

    def extend(self, saved, intervened_only=False):
        """Add, in order, the transitions of `read` arrays of a buffer that never wrapped (one episode)."""
        for i in np.flatnonzero(saved["valid"] & (saved["intervened"] | (not intervened_only))):
            obs = {k: saved[k][i] for k in self.image_keys + self.vector_keys}
            next_obs = {k: saved[k][i + 1] if k in self.image_keys else saved["next_" + k][i] for k in obs}
            self.add(obs, saved["act"][i], saved["rew"][i], next_obs, saved["terminated"][i],
                     saved["truncated"][i], saved["intervened"][i], saved["grasp_penalty"][i])


def load_episodes(folder, online, demo, at_least=0):
    """A run folder's episode files, in order, into the online buffer, and their human steps into the
    demo buffer, as the loop added them -> the episodes' log rows. Files 1..N, N >= at_least, or none."""
    paths = sorted(pathlib.Path(folder).glob("episode_*.npz"))
    numbers = [int(path.stem.split("_")[1]) for path in paths]
    missing = sorted(set(range(1, max([at_least, *numbers]) + 1)) - set(numbers))
    if missing:   # a resume over the gap would learn as if those episodes never happened
        named = ", ".join(map(str, missing[:3])) + " ..." * (len(missing) > 3)
        raise ValueError(f"{folder}: episode files {named} are missing; restore them from a copy, or start "
                         "a new run")
    rows = []
    for path in paths:
        saved = online.read(path)
        online.extend(saved)
        demo.extend(saved, intervened_only=True)
        rows.append({k[4:]: saved[k].item() for k in saved if k.startswith("log/")})
    return rows


@contextlib.contextmanager
def lock_run_folder(folder):
    """The folder locked while the with block runs, or until the process ends, even killed: a second run
    on the same folder would mix its episodes and config with this one's. The lock is on the folder
    itself, so it leaves no file behind."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{folder} is in use by another run; wait for it to end, or pick another "
                             "--run_dir") from None
        yield
    finally:
        os.close(fd)


def write_atomically(path, text):
    """A text file, new or as it was, never half of one, whenever the process stops."""
    with open(f"{path}.tmp", "w", newline="") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def writable(path):
    """path, once its folder exists and takes files: checked before a human records into it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise ValueError(f"{path}: cannot write in {folder} ({error.strerror}); pick another path") from None
    return path


def read_npz(path):
    """{name: array} of an .npz file, or one line saying it cannot be read. No Python objects: a file
    of someone else's is data, never code."""
    if os.path.exists(path) and not os.path.isfile(path):   # a FIFO or a device would block np.load
        raise ValueError(f"{path}: not a regular file; pass an .npz file")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile):   # TypeError: an .npy, not an .npz
        raise ValueError(f"{path}: not a readable .npz file (missing, truncated, corrupt or holding Python "
                         "objects); record it again or restore a copy") from None


def save_npz(path, arrays):
    """np.savez atomically: a temporary file in the same folder, on disk (fsync), then a rename, so a crash,
    a kill or a power cut at any moment leaves either the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp.npz")
    os.chmod(tmp, 0o644)             # mkstemp makes it private; a recording is for sharing
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        os.unlink(tmp)
        if isinstance(error, OSError):   # a full disk: say which file, and how much it needs
            size_mb = sum(a.nbytes for a in arrays.values()) / 1e6
            raise OSError(f"{path}: not written ({error.strerror or error}); it needs {size_mb:.1f} MB: free "
                          "disk space (the file as it was is kept)") from None
        raise


def sample_batches(demo, online, num_batches, batch_size, rng, frames=True):
    """num_batches batches, each half demo and half online (RLPD's symmetric sampling).

    Returned arrays have shape (num_batches, batch_size, ...): rows [:batch_size // 2] of every
    batch come from the demo buffer, the rest from the online buffer. Drawing a whole control
    step's batches at once lets the caller move them to the GPU in one copy. frames: see gather.
    """
    half = batch_size // 2
    d = demo.gather(demo.sample_indices(num_batches * half, rng).reshape(num_batches, half), frames)
    o = online.gather(online.sample_indices(num_batches * half, rng).reshape(num_batches, half), frames)
    return {k: np.concatenate([d[k], o[k]], axis=1) for k in d}
