"""hilserl.py's update made fast: the same functions, compiled, and on a GPU one CUDA graph a step.

With --compile, hilserl.py makes a Learner and calls it in place of `learn(agent, optimizers, cfg, batches)`:
it runs hilserl.learn with compiled forms of its three functions, and is tested against it.
  - each critic update, and the actor update, is one graph that torch.compile fuses into a few kernels; as
    `.backward()` would cut it, torch.func.grad gives gradients, and Adam is written out on Adam's own state;
  - on a GPU, a control step is one CUDA graph (at this size a GPU waits on kernel launches); on a CPU:
    tanh as a sigmoid, glibc keeps freed memory, guards checked only while compiling.
"""

import contextlib
import ctypes
import os
import shutil

import torch

import hilserl
from networks import DEVICE_CAN


def keep_freed_memory():
    """Let glibc keep freed memory for reuse instead of returning it to the OS (Linux with glibc only):
    at batch 256 and width 256 every activation is a block it would return, then page-fault back in."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: blocks up to 32 MB come from the reusable heap
        libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap


def check_compiler(device):
    """On a CPU torch.compile builds C++ kernels: without a compiler, one line, not Inductor's traceback."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        raise SystemExit("error: --compile on a CPU needs a C++ compiler (g++ or clang++); install one or "
                         "leave out --compile")


class SigmoidTanh(torch.nn.Module):
    """tanh(x) = 2 sigmoid(2x) - 1: on a CPU, torch's and Inductor's tanh are slower (figures in README)."""

    def forward(self, x):
        return torch.sigmoid(2 * x) * 2 - 1


def swap_tanh(agent):
    """Every nn.Tanh in the agent becomes a SigmoidTanh (no parameters: checkpoints are unchanged)."""
    for module in list(agent.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Tanh):
                setattr(module, name, SigmoidTanh())


class AdamState:
    """torch.optim.Adam's state in lists, as its first step makes it (checkpoints match); `named`: by name."""

    def __init__(self, optimizer, agent):
        group = optimizer.param_groups[0]
        self.params, self.lr, self.betas, self.eps = (group[k] for k in ("params", "lr", "betas", "eps"))
        for p in self.params:
            if not optimizer.state[p]:
                optimizer.state[p].update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))
        states = [optimizer.state[p] for p in self.params]
        self.m, self.v, self.steps = ([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step"))
        names = {p: name for name, p in agent.named_parameters()}
        self.named = {names[p]: p for p in self.params}

    def step(self, grads):
        # PAPER: Kingma & Ba 2015, Algorithm 1: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
        # theta <- theta - lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
        (beta1, beta2), t = self.betas, self.steps[0] + 1
        torch._foreach_add_(self.steps, 1)
        torch._foreach_lerp_(self.m, grads, 1 - beta1)
        torch._foreach_mul_(self.v, beta2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - beta2)
        m_hat = torch._foreach_div(self.m, 1 - beta1 ** t)
        v_hat = torch._foreach_div(self.v, 1 - beta2 ** t)
        torch._foreach_addcdiv_(self.params, m_hat, torch._foreach_add(torch._foreach_sqrt(v_hat), self.eps),
                                value=-self.lr)


class Losses(torch.nn.Module):
    """A hilserl loss as a module: functional_call runs it on the parameters that grad differentiates."""

    def __init__(self, agent, loss):
        super().__init__()
        self.agent, self.loss = agent, loss

    def forward(self, *args):
        return self.loss(self.agent, *args)


def gradients(losses, params, *args):
    """({name: gradient} of the sum of the first two losses with respect to params, all the outputs)."""
    def total(params):
        outputs = torch.func.functional_call(losses, params, args)
        return outputs[0] + outputs[1], outputs
    grads, outputs = torch.func.grad(total, has_aux=True)({"agent." + k: p for k, p in params.items()})
    return {k.removeprefix("agent."): g for k, g in grads.items()}, outputs


def critic_step(losses, adam, batch, next_act, discount, tau):
    """hilserl.critic_step, traceable as one graph."""
    grads, (critic_loss, grasp_loss, q) = gradients(losses, adam.named, batch, next_act, discount)
    adam.step(list(grads.values()))
    # PAPER: soft target update thetabar <- (1 - tau) thetabar + tau theta (SAC; hil-serl averages all)
    torch._foreach_lerp_(losses.agent.target_params, adam.params, tau)
    half = len(q) // 2   # a batch's demo rows come first
    return {"loss/critic": critic_loss, "loss/grasp_critic": grasp_loss,
            "q/demo": q[:half].mean(), "q/online": q[half:].mean()}


def actor_step(losses, actor_adam, temperature_adam, obs, entropy_target):
    """hilserl.actor_step, traceable as one graph: the actor loss trains the actor only, the
    temperature loss alpha only, so one gradient of their sum serves both."""
    grads, (actor_loss, temperature_loss, stats) = gradients(
        losses, {**actor_adam.named, **temperature_adam.named}, obs, entropy_target)
    actor_adam.step([grads[name] for name in actor_adam.named])
    temperature_adam.step([grads[name] for name in temperature_adam.named])
    return {"loss/actor": actor_loss, "loss/temperature": temperature_loss, **stats}


# no_grad around each update: torch.func.grad makes its own gradients, the rest needs no autograd
compiled_critic_step = torch.compile(torch.no_grad()(critic_step))
compiled_actor_step = torch.compile(torch.no_grad()(actor_step))
compiled_next_actions = torch.compile(hilserl.next_actions)


def leaves(tree):   # the tensors of a nested dict, in order
    return [t for v in tree.values() for t in (leaves(v) if isinstance(v, dict) else [v])]


class Learner:
    """hilserl.learn as `Learner(agent, optimizers, cfg, batches)(batches)`, compiled on the first batches."""

    def __init__(self, agent, optimizers, cfg, batches):
        device = batches["act"].device
        self.agent, self.optimizers, self.cfg, self.graph = agent, optimizers, cfg, None
        self.eager = "compile" not in DEVICE_CAN[device.type]   # networks.DEVICE_CAN: what each device can do
        if self.eager:
            print(f"--compile: not measured on {device.type}; the eager update runs")
            return
        check_compiler(device)
        if batches["act"].device.type == "cpu":
            keep_freed_memory()
            swap_tanh(agent)
        self.adams = {name: AdamState(o, agent) for name, o in optimizers.items()}
        self.critic_losses, self.actor_losses = (Losses(agent, hilserl.critic_losses),
                                                 Losses(agent, hilserl.actor_losses))
        state = [*agent.state_dict().values(), *(t for a in self.adams.values() for t in a.m + a.v + a.steps)]
        before = [t.clone() for t in state]   # compiling runs real updates; the agent starts untouched
        print("compiling the update (about 30 s)...")
        if "cuda_graphs" in DEVICE_CAN[device.type]:
            self.capture(batches)
        else:
            self.learn(batches)
        torch._foreach_copy_(state, before)

    # hilserl.critic_step and actor_step, each one compiled graph on this Learner's agent and Adam state
    def critic_update(self, agent, optimizer, batch, next_act, discount, tau):
        return compiled_critic_step(self.critic_losses, self.adams["critic"], batch, next_act, discount, tau)

    def actor_update(self, agent, actor_optimizer, temperature_optimizer, obs, entropy_target):
        return compiled_actor_step(self.actor_losses, self.adams["actor"], self.adams["temperature"],
                                   obs, entropy_target)

    def learn(self, batches):
        return hilserl.learn(self.agent, self.optimizers, self.cfg, batches, self.critic_update,
                             self.actor_update, compiled_next_actions)

    def capture(self, batches):
        """Record one control step's kernels as a CUDA graph, after warm-up runs on a side stream
        (compiling, and the allocations the graph must not make). Its inputs: these batch tensors."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.learn(batches)
        torch.cuda.current_stream().wait_stream(side)
        self.graph, self.inputs = torch.cuda.CUDAGraph(), batches
        with torch.cuda.graph(self.graph):
            self.stats = self.learn(batches)

    def __call__(self, batches):
        if self.eager:
            return hilserl.learn(self.agent, self.optimizers, self.cfg, batches)
        if self.graph is None:   # after the warm-up, every call brings tensors of the same shapes and types:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):   # skip re-checking them each time
                return self.learn(batches)
        torch._foreach_copy_(leaves(self.inputs), leaves(batches))
        self.graph.replay()
        return {k: v.clone() for k, v in self.stats.items()}   # the next replay overwrites them
