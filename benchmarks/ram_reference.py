"""A reference Recurrent Attention Model built the way the widely used PyTorch implementation
builds it, for benchmarks/ram_speed.py to race against.

Mnih et al. 2014, "Recurrent Models of Visual Attention", as that implementation structures it:

* a retina that cuts the glimpse out of each image **in a Python loop over the batch** (one
  slice per sample and scale, then ``torch.stack``), each further scale twice as wide and
  average-pooled back to ``patch`` pixels;
* a glimpse network ``g = relu(W_g relu(W_phi phi) + W_l relu(W_loc l))`` (128 + 128 -> 256);
* a ReLU RNN core ``h = relu(W_i g + W_h h)`` of ``hidden`` units;
* a Gaussian location policy ``l ~ N(tanh(W_2 relu(W_1 h)), std)`` on the detached core state,
  clipped to [-1, 1], the first location uniform;
* a linear baseline on the detached core state and a linear classifier on the last state;
* the hybrid loss: cross-entropy + squared error of the baseline + REINFORCE with the 0/1
  reward of the final prediction credited to every glimpse.

It is written here from that description; it is the per-sample loop the issue measured at about
4,400 and 3,000 samples/s on these machines, so this file lets one run time both programs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal


class ReferenceRAM(nn.Module):
    """RAM with a per-sample retina. Images ``(B, 1, H, W)`` float in [0, 1], labels ``(B,)``."""

    def __init__(
        self,
        patch: int,
        scales: int,
        glimpses: int,
        hidden: int = 256,
        classes: int = 10,
        std: float = 0.05,
    ):
        super().__init__()
        self.patch, self.scales, self.glimpses, self.hidden, self.std = (
            patch,
            scales,
            glimpses,
            hidden,
            std,
        )
        self.fc_phi = nn.Linear(patch * patch * scales, 128)
        self.fc_loc = nn.Linear(2, 128)
        self.fc_what = nn.Linear(128, hidden)
        self.fc_where = nn.Linear(128, hidden)
        self.i2h = nn.Linear(hidden, hidden)
        self.h2h = nn.Linear(hidden, hidden)
        self.loc1 = nn.Linear(hidden, hidden // 2)
        self.loc2 = nn.Linear(hidden // 2, 2)
        self.baseline = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, classes)

    def extract(self, x: torch.Tensor, loc: torch.Tensor, size: int) -> torch.Tensor:
        """``size``-pixel squares centred on the locations ``loc: (B, 2)`` in [-1, 1] (x, y),
        one slice per sample."""
        side = x.shape[-1]
        centre = (0.5 * (loc + 1.0) * side).long()  # pixel coordinates
        half = size // 2
        x = F.pad(x, (half, half, half, half))
        patches = []
        for i in range(x.shape[0]):  # the per-sample loop
            cx, cy = int(centre[i, 0]), int(centre[i, 1])  # padded top-left of the window
            patches.append(x[i, :, cy : cy + size, cx : cx + size])
        return torch.stack(patches)

    def retina(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """The flattened multi-scale glimpse ``(B, scales * patch * patch)``."""
        out, size = [], self.patch
        for s in range(self.scales):
            p = self.extract(x, loc, size)
            out.append(F.avg_pool2d(p, 2**s) if s else p)
            size *= 2
        return torch.cat(out, dim=1).flatten(1)

    def glimpse(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        what = F.relu(self.fc_phi(self.retina(x, loc)))
        where = F.relu(self.fc_loc(loc))
        return F.relu(self.fc_what(what) + self.fc_where(where))

    def forward(
        self, x: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits ``(B, C)``, log-probabilities ``(B, K)`` of the sampled locations and
        the baselines ``(B, K)``. ``sample=False`` follows the policy's mean (testing)."""
        b = x.shape[0]
        h = x.new_zeros(b, self.hidden)
        loc = torch.empty(b, 2, device=x.device).uniform_(-1, 1)
        log_pi, baselines = [], []
        for t in range(self.glimpses):
            h = F.relu(self.i2h(self.glimpse(x, loc)) + self.h2h(h))
            baselines.append(self.baseline(h.detach()).squeeze(1))
            mu = torch.tanh(self.loc2(F.relu(self.loc1(h.detach()))))
            if t < self.glimpses - 1:  # where the next glimpse goes
                loc = (mu + self.std * torch.randn_like(mu) if sample else mu).clamp(-1, 1).detach()
                log_pi.append(Normal(mu, self.std).log_prob(loc).sum(1))
        log_pi.append(torch.zeros_like(baselines[0]))  # the last state chooses no glimpse
        return self.classifier(h), torch.stack(log_pi, 1), torch.stack(baselines, 1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, log_pi, baselines = self(x)
        reward = (logits.argmax(1) == y).float().unsqueeze(1).expand_as(baselines)
        advantage = (reward - baselines).detach()
        reinforce = -(log_pi * advantage).sum(1).mean()
        return F.cross_entropy(logits, y) + F.mse_loss(baselines, reward) + reinforce

    @torch.no_grad()
    def error(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
        """Test error, following the policy's mean."""
        was_training = self.training
        self.eval()
        wrong = 0
        for i in range(0, len(labels), batch_size):
            logits, _, _ = self(grey(images[i : i + batch_size]), sample=False)
            wrong += int((logits.argmax(1) != labels[i : i + batch_size]).sum())
        self.train(was_training)
        return wrong / len(labels)


def grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` digit images (grey in every channel) -> ``(B, 1, H, W)`` in [0, 1]."""
    return images[:, :1].float() / 255.0
