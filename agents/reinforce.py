"""Hard attention learned with REINFORCE (Williams 1992; Xu et al. 2015 section 4.1).

At every word the agent samples ONE cell from a categorical policy over the grid,
``pi(l | h) = softmax(attention_logits(h))``, and the decoder reads only that cell. Sampling has
no useful gradient, so the two halves learn differently:

* the word predictor (encoder, LSTM, output layers) by backprop of the caption cross-entropy,
  given the sampled glimpses (the targets ride in the environment's ``info``);
* the location policy by the policy gradient ``-(G_t - b_t) log pi(l_t)``, where ``G_t`` is the
  reward-to-go from the environment (the reward of word ``t`` and of every later word, since the
  glimpse also shapes the LSTM state) and ``b_t`` a baseline; plus an entropy bonus.

Every term is a mean over the real target words of the batch, so the losses are on one scale.
What must never happen, and is tested: the caption loss reaching the policy's parameters through
the sampled location, the reward or the baseline carrying gradient, the value regression
changing the decoder.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rl_attn import distributed
from rl_attn.agents.all_cells import AllCells, all_cells_policy_loss
from rl_attn.agents.base import CaptionAgent, Location, Rollout, draw_cells
from rl_attn.agents.cell_reconstruction import CellReconstruction
from rl_attn.decoder import Decoder, DecoderState
from rl_attn.distributed import all_sum, mean_count
from rl_attn.encoder import Encoder
from rl_attn.envs.glimpse import SILENT
from rl_attn.envs.sensors import PatchSensor, Sensor, SensorView
from rl_attn.errors import UserError

BASELINES = ("none", "moving_average", "value", "leave_one_out", "self_critical")
PAIRED = ("leave_one_out", "self_critical")  # baselines from an image's other paths
TEST_MODES = ("argmax", "sample", "expectation")
BRANCHES = ("episode", "word", "all")


class ReinforceAgent(CaptionAgent):
    """Hard attention: one sampled cell per word, the policy trained by REINFORCE.

    Args:
        encoder, decoder: the shared modules.
        baseline: ``auto`` (the default: ``none`` with ``branch=all``, whose baseline is its
            own, else ``value``; see :func:`auto_estimator`); ``none``; ``moving_average``
            (per word position, an exponential moving average of the batch-mean return);
            ``value`` (a linear value head on the detached decoder
            state, regressed on the return); ``leave_one_out`` (with ``samples_per_image`` >= 2:
            the mean return of the image's other samples at the same word); ``self_critical``
            (with ``samples_per_image`` >= 2: the last path of each image reads the policy's
            argmax cells instead of samples, and its return at the same word is the baseline of
            the image's sampled paths, as in self-critical sequence training, Rennie et al.
            2017; the argmax path adds no policy-gradient term but trains the captioner, so the
            classifier also learns from the path ``test_mode=argmax`` reads).
        samples_per_image: glimpse sequences sampled per training image (the image is encoded
            once); the caption loss averages over all of them.
        branch: ``auto`` (the default): ``all`` wherever it applies (captions over the
            feature grid with ``gamma=0``, one path per image reading one cell per word,
            revisits allowed, every glimpse sampled), else ``episode``; settled here for
            captions over the grid, by :meth:`use_sensor` for a patch sensor, and by the trainer
            for its task (:meth:`resolve_auto`). Else where an image's samples part:
            ``episode`` (independent glimpse sequences) or
            ``word`` (a vine: at every word the samples read their own cells, drawn from the
            policy at one shared decoder state, are scored on that word, and all go on from the
            first sample's state; with ``leave_one_out`` each glimpse is then compared with
            the other glimpses tried for the same word from the same state). ``word`` needs
            ``gamma=0`` (a sample's later words are the first sample's), ``samples_per_image``
            >= 2, no expected-context captions, and a task that scores every glimpse's word
            (captions, not classification); or ``all`` (every cell scored at every word: the
            policy term is the exact expectation over the word's cell of REINFORCE's, from the
            reward every cell would have earned, computed without autograd in one batched
            decoder step; see :mod:`rl_attn.agents.all_cells`). ``all`` needs ``gamma=0``,
            ``baseline=none`` (its baseline is the policy's expected reward over the cells),
            ``samples_per_image=1``, ``cells_per_step=1``, no expected-context captions,
            ``sensor=grid`` and captions.
        scored_cells: with ``branch=all``, a number ``m`` (4, the default) scores the ``m``
            most probable cells and one drawn from the others, weighted by their mass
            (sum-and-sample: unbiased, ``(m + 1) / L`` of the cost); ``None`` scores every
            cell at every word. Other branches do not use it.
        gae_lambda: ``None`` (the default): a glimpse's advantage is its discounted
            reward-to-go minus the baseline. A number in [0, 1]: generalised advantage
            estimation (Schulman et al. 2016) over the value head's estimates (needs
            ``baseline=value``): the advantage is the lambda-return ``G^lambda_t = r_t + d_t
            ((1 - lambda) V_{t+1} + lambda G^lambda_{t+1})`` minus ``V_t``, and the value
            head regresses on the lambda-return; 1 is the Monte Carlo advantage, 0 the
            one-step TD error ``r_t + d_t V_{t+1} - V_t``.
        probe_caption: with ``branch=word``, the probes' words train the captioner too (by
            backprop through their decoder steps, as the first samples' do); otherwise the
            probes only measure, without autograd, and the caption loss is the first samples'.
        gamma: discount of the reward-to-go, ``G_t = sum_k gamma^k r_{t+k}`` over scored
            predictions: 1 credits a glimpse with its word and every later word; 0 with its own
            word only (less variance, blind to what the glimpse does to the LSTM state), or in
            a classification episode with the class it is read for (see :meth:`reward_to_go`).
        entropy_coef: weight of the policy-entropy bonus.
        value_coef: weight of the value head's squared error (``baseline=value`` only).
        normalize_advantage: standardise the advantages over the batch's real words.
        moving_average_decay: decay of the ``moving_average`` baseline.
        expected_context_prob: Xu et al.'s trick: each training caption, with this probability,
            reads the expected (soft) context instead of a sample; such captions add no
            policy-gradient term, and their attention is trained by backprop instead.
        soft_warmup_steps: a curriculum on that trick: the probability starts at 1 (all soft)
            and falls linearly to ``expected_context_prob`` over this many training updates, so
            the decoder first learns to use glimpses and the policy starts from a useful
            attention map; 0 turns it off.
        soft_warmup_hold: the share of the warm-up, in [0, 1], that stays at probability 1
            (every caption soft) before the fall begins: 0 is a linear fall from the first
            update, 1 a single switch to sampled glimpses after ``soft_warmup_steps``.
        test_mode: how a location is chosen outside training: ``argmax`` (the most probable
            cell), ``sample``, or ``expectation`` (the soft context; then it is not hard).
        reward: the environment's word reward, ``log_likelihood`` or ``correct``.
        detach_policy_input: the policy scores a detached decoder state and grid, so the
            policy gradient trains only the attention MLP and leaves the encoder and the LSTM to
            the caption loss (as RAM implementations detach the core state for the locator),
            except for the shares that ``encoder_policy_grad`` and ``state_policy_grad`` let
            through the keys and the state;
            ``False`` lets the policy gradient shape them too. Captions that read the expected
            context are never detached: their attention learns by backprop, as soft's does.
        temperature: the policy is ``softmax(logits / temperature)`` (the expected context of
            Xu et al.'s trick too); below 1 it starts sharper and each update sharpens it more.
            ``argmax`` at test time does not depend on it.
        cells_per_step: ``k``, the cells read per word. They are drawn from the policy one after
            another without replacement, and the glimpse is their mean. The policy term then
            uses the log-probability of the ordered draw (Plackett-Luce):
            ``sum_i log pi(l_i) - log(1 - sum_{j<i} pi(l_j))``. At test time ``argmax`` reads
            the ``k`` most probable cells. Must not exceed the number of cells.
        policy_lr_scale: the location policy's parameters (the attention MLP) learn at this
            multiple of ``trainer.lr``; everything else at ``trainer.lr``. ``auto`` (the
            default): 0.5 with ``branch=all``, whose exact policy term would otherwise sharpen
            the policy before the captioner has learned from the rest of the grid, and 1
            with the noisier estimators (benchmarks/RESULTS.md, issue 14, "A fifth session").
        encoder_policy_grad: with ``branch=all`` and ``detach_policy_input``, the policy
            gradient also trains the encoder, through the attention keys (only there: the LSTM
            state the policy sees stays detached), at this multiple of the expected reward's own
            gradient (times ``policy_coef``): the advantages' standardisation, which sets the
            attention MLP's step, is undone on that path. 0: the policy gradient stops at
            the attention MLP. ``auto`` (the default): 0.3 with ``branch=all`` and a detached
            input, else 0 (benchmarks/RESULTS.md, issue 14, "An eighth session").
        state_policy_grad: the same through the decoder state the policy sees: the policy
            gradient also trains the LSTM, and through it the word embeddings and the cells
            read before, at this multiple of the expected reward's own gradient. ``auto`` (the
            default): 0.3 with ``branch=all`` and a detached input, else 0 (RESULTS, "A ninth
            session").
        policy_coef: weight of the policy-gradient term. 0 is a control: the policy learns
            nothing from reward (after a warm-up it stays the map soft attention made).
        revisit: ``True``: every step may read any cell. ``False``: an episode reads no cell
            twice until it has read them all (the policy is renormalised over the cells not
            yet read, in training and at test time; its log-probabilities, the policy
            gradient's, are the renormalised ones). Needs every glimpse sampled or chosen by
            argmax: no expected-context captions, no soft warm-up, ``branch=episode``, and a
            ``test_mode`` other than ``expectation``.
        cell_reconstruction: weight of an auxiliary loss in which every cell's vector, through
            a linear head, reconstructs the pixels of its own square of the image (see
            :mod:`rl_attn.agents.cell_reconstruction`): it keeps the cells' receptive fields on
            their squares, which training through one read cell per word moves. No label and
            no attention score is involved. 0 turns it off; needs ``sensor=grid``.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        baseline: str = "auto",
        samples_per_image: int = 1,
        branch: str = "auto",
        probe_caption: bool = False,
        scored_cells: int | None = 4,
        gae_lambda: float | None = None,
        gamma: float = 0.0,
        entropy_coef: float = 0.0,
        value_coef: float = 0.5,
        normalize_advantage: bool = True,
        moving_average_decay: float = 0.9,
        expected_context_prob: float = 0.0,
        soft_warmup_steps: int = 0,
        soft_warmup_hold: float = 0.0,
        test_mode: str = "argmax",
        reward: str = "log_likelihood",
        detach_policy_input: bool = True,
        temperature: float = 0.25,
        cells_per_step: int = 1,
        policy_lr_scale: float | str = "auto",
        policy_coef: float = 1.0,
        revisit: bool = True,
        encoder_policy_grad: float | str = "auto",
        state_policy_grad: float | str = "auto",
        cell_reconstruction: float = 0.0,
    ):
        super().__init__(encoder, decoder, reward)
        # what was asked for: an ``auto`` is settled here for captions over the grid, and again
        # by use_sensor for a patch sensor (the trainer settles it in the config for its task)
        self.requested = {
            "branch": branch,
            "baseline": baseline,
            "policy_lr_scale": policy_lr_scale,
            "encoder_policy_grad": encoder_policy_grad,
            "state_policy_grad": state_policy_grad,
        }
        branch, baseline = auto_estimator(locals(), grid_captions=True)  # locals: the arguments
        self.policy_lr_scale = _policy_rate(policy_lr_scale, branch)
        _check_revisit(revisit, expected_context_prob, soft_warmup_steps, branch, test_mode)
        self.revisit = revisit
        if not policy_coef >= 0:
            raise ValueError(f"policy_coef must be >= 0, got {policy_coef}")
        self.policy_coef = policy_coef
        if baseline not in BASELINES:
            raise ValueError(
                f"baseline must be one of auto, {', '.join(BASELINES)}, got {baseline!r}"
            )
        if test_mode not in TEST_MODES:
            raise ValueError(f"test_mode must be one of {', '.join(TEST_MODES)}, got {test_mode!r}")
        if samples_per_image < 1 or (baseline in PAIRED and samples_per_image < 2):
            raise ValueError(
                f"samples_per_image must be >= 1, and >= 2 for the {baseline} baseline; "
                f"got {samples_per_image} with baseline={baseline}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        if not isinstance(cells_per_step, int) or cells_per_step < 1:
            raise ValueError(f"cells_per_step must be a positive integer, got {cells_per_step!r}")
        self.cells_per_step = cells_per_step
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if not 0.0 <= expected_context_prob <= 1.0:
            raise ValueError(
                f"expected_context_prob must be in [0, 1], got {expected_context_prob}"
            )
        _check_branch(branch, samples_per_image, gamma, expected_context_prob, soft_warmup_steps)
        _check_all_cells(branch, baseline, samples_per_image, cells_per_step, scored_cells)
        self.scored_cells = scored_cells
        _check_self_critical(baseline, expected_context_prob, soft_warmup_steps, branch)
        self.branch, self.probe_caption = branch, probe_caption
        _check_gae(gae_lambda, baseline)
        self.gae_lambda = gae_lambda
        self.baseline, self.test_mode, self.gamma = baseline, test_mode, gamma
        self.samples_per_image, self.detach_policy_input = samples_per_image, detach_policy_input
        self.encoder_policy_grad, self.state_policy_grad = (  # the shares beyond the MLP
            _outer_policy_grad(name, self.requested[name], branch, detach_policy_input)
            for name in OUTER_POLICY_GRADS
        )
        # the keys' and the state's gradient factors, set by each update's loss
        self._key_factor, self._state_factor = [0.0], [0.0]
        self.entropy_coef, self.value_coef = entropy_coef, value_coef
        self.normalize_advantage = normalize_advantage
        self.moving_average_decay = moving_average_decay
        self.expected_context_prob = expected_context_prob
        if soft_warmup_steps < 0:
            raise ValueError(f"soft_warmup_steps must be >= 0, got {soft_warmup_steps}")
        if not 0.0 <= soft_warmup_hold <= 1.0:
            raise ValueError(f"soft_warmup_hold must be in [0, 1], got {soft_warmup_hold}")
        self.soft_warmup_steps = soft_warmup_steps
        self.soft_warmup_hold = round(soft_warmup_hold * soft_warmup_steps)  # in updates
        # Training rollouts drawn so far (one per batch): the clock of the warm-up schedule.
        self.register_buffer("rollouts", torch.zeros((), dtype=torch.long))
        self.value_head = nn.Linear(decoder.hidden_dim, 1) if baseline == "value" else None
        # Moving-average baseline per word position; NaN until a position has been seen.
        self.register_buffer("average_return", torch.full((64,), float("nan")))
        # the cells' reconstruction loss (None at weight 0) and its weight
        self.reconstruction, self.cell_reconstruction = (
            _reconstruction(encoder, cell_reconstruction),
            cell_reconstruction,
        )

    @staticmethod
    def resolve_auto(settings: dict, patch: bool, classification: bool) -> dict[str, Any]:
        """The ``branch``, ``baseline``, ``policy_lr_scale``, ``encoder_policy_grad`` and
        ``state_policy_grad`` that ``auto`` in the agent config ``settings`` means for a task
        (``classification`` or captions) over a sensor (``patch`` or the grid): see
        :func:`auto_estimator`, :func:`auto_policy_rate` and :func:`auto_outer_policy_grad`.
        The trainer writes them into the run's config."""
        defaults = inspect.signature(ReinforceAgent.__init__).parameters
        asked = {name: p.default for name, p in defaults.items()} | settings
        branch, baseline = auto_estimator(asked, grid_captions=not patch and not classification)
        rate = auto_policy_rate(asked["policy_lr_scale"], branch)
        detach = asked["detach_policy_input"]
        return {
            "branch": branch,
            "baseline": baseline,
            "policy_lr_scale": rate,
            **{k: auto_outer_policy_grad(asked[k], branch, detach) for k in OUTER_POLICY_GRADS},
        }

    def use_sensor(self, sensor: Sensor) -> None:
        if isinstance(sensor, PatchSensor) and self.cell_reconstruction:
            raise UserError(
                "agent.cell_reconstruction reconstructs each cell of the feature grid, so it "
                "needs sensor=grid (sensor=patch encodes only the cells read); set it to 0"
            )
        if isinstance(sensor, PatchSensor) and self.branch == "all":
            if self.requested["branch"] != "auto":
                raise UserError(
                    "agent.branch=all scores every cell of the feature grid at every word, so "
                    "it needs sensor=grid (sensor=patch encodes only the cells read)"
                )
            self._settle_for_patches()
        super().use_sensor(sensor)

    def _settle_for_patches(self) -> None:
        """The ``auto`` branch settled for the grid becomes ``episode`` over patches (and an
        ``auto`` baseline ``value``, with its head; an ``auto`` policy rate 1; an ``auto``
        encoder_policy_grad and state_policy_grad 0)."""
        self.branch = "episode"
        if self.requested["policy_lr_scale"] == "auto":
            self.policy_lr_scale = auto_policy_rate("auto", self.branch)
        for name in OUTER_POLICY_GRADS:
            if self.requested[name] == "auto":
                setattr(self, name, 0.0)
            elif getattr(self, name):
                raise UserError(
                    f"agent.{name} > 0 needs branch=all, which needs sensor=grid; "
                    f"set agent.{name}=0 (or auto) with sensor=patch"
                )
        if self.requested["baseline"] == "auto":
            self.baseline = "value"
            device = self.decoder.att_score.weight.device
            self.value_head = nn.Linear(self.decoder.hidden_dim, 1).to(device)

    def param_groups(self, lr: float) -> list[dict]:
        groups = super().param_groups(lr)
        if self.policy_lr_scale == 1.0:
            return groups
        policy = {id(p) for p in self.policy_parameters()}
        rest = [p for p in groups[0]["params"] if id(p) not in policy]
        faster = [p for p in groups[0]["params"] if id(p) in policy]
        return [{"params": rest}, {"params": faster, "lr": lr * self.policy_lr_scale}]

    def policy_parameters(self) -> list[nn.Parameter]:
        """The attention MLP: what scores the cells, so what the policy gradient trains."""
        d = self.decoder
        return [*d.att_grid.parameters(), *d.att_hidden.parameters(), *d.att_score.parameters()]

    def init_state(self, view: SensorView, soft: torch.Tensor | None = None) -> DecoderState:
        summary = view.summary
        scaled = self._key_factor if self.encoder_policy_grad else None
        return self.decoder.init_state(summary, self._policy_input(summary, soft, scaled))

    def attention_logits(
        self, state: DecoderState, soft: torch.Tensor | None = None
    ) -> torch.Tensor:
        scaled = self._state_factor if self.state_policy_grad else None
        h = self._policy_input(state.h, soft, scaled)
        if h is not None:
            state = DecoderState(h, state.c, state.keys)
        return self.decoder.attention_logits(state)

    def _policy_input(
        self, x: torch.Tensor, soft: torch.Tensor | None, scaled: list[float] | None = None
    ) -> torch.Tensor | None:
        """``x`` (rows first) as the policy should see it in training with
        ``detach_policy_input``: detached in the rows that sample their glimpses, so the
        policy gradient stops at the attention MLP, and attached in the ``soft: (B,)`` rows that
        read the expected context (Xu et al.'s trick), whose attention is trained by backprop
        like the soft agent's, encoder and LSTM included. ``None`` where nothing is detached.
        With ``scaled`` (the factor of ``encoder_policy_grad`` or ``state_policy_grad``, which
        need every row sampled) the gradient is let through times ``scaled[0]`` instead."""
        if not (self.detach_policy_input and self.training):
            return None
        if soft is None or not bool(soft.any()):
            return x.detach() if scaled is None else _ScaledGrad.apply(x, scaled)
        if bool(soft.all()):
            return None
        return torch.where(soft.view(-1, *([1] * (x.dim() - 1))), x, x.detach())

    def log_policy(self, logits: torch.Tensor) -> torch.Tensor:
        """``log softmax(logits / temperature)``, ``(B, L)``: the policy's log-probabilities."""
        t = self.temperature
        return F.log_softmax(logits / t if t != 1 else logits, dim=1)

    def locate(
        self,
        logits: torch.Tensor,
        state: DecoderState,
        soft: torch.Tensor | None = None,
        given: torch.Tensor | None = None,
        greedy: torch.Tensor | None = None,
    ) -> Location:
        """The location for ``logits: (B, L)``; in training, the rows of ``soft: (B,)`` (Xu et
        al.'s trick) read the expected context instead of their sample, and ``given: (B, k)``
        cells replace the sample (to score an earlier rollout's cells under today's policy);
        the rows of ``greedy: (B,)`` read the most probable cells instead of their sample (the
        self-critical paths)."""
        log_pi = self.log_policy(logits)
        pi = log_pi.exp()
        mode = "sample" if self.training else self.test_mode
        if mode == "expectation":
            return Location(action=pi, weights=pi)
        k, n_cells = self.cells_per_step, logits.shape[1]
        if k > n_cells:
            raise ValueError(
                f"agent.cells_per_step={k} is more than the {n_cells} cells a step can read"
            )
        if given is not None:
            cells = given
        elif mode == "sample":  # a sample: no gradient path; k draws without replacement
            cells = draw_cells(pi.detach(), k)
            if greedy is not None:
                cells = torch.where(greedy.unsqueeze(1), logits.topk(k, dim=1).indices, cells)
        else:
            cells = logits.topk(k, dim=1).indices
        weights = torch.zeros_like(logits).scatter_(1, cells, 1.0 / k)
        cell = cells.squeeze(1) if k == 1 else cells
        if not self.training:
            return Location(action=cell, weights=weights)
        action = cell
        if soft is not None:  # Xu et al.: these captions read the expectation
            weights = torch.where(soft.unsqueeze(1), pi, weights)
            action = weights
        value = None
        if self.value_head is not None:
            value = self.value_head(state.h.detach()).squeeze(1)
        return Location(
            action=action,
            weights=weights,
            log_prob=_draw_log_prob(log_pi, cells),
            # a cell closed by -inf (no revisit) has pi 0 and log pi -inf: it adds 0, not NaN
            entropy=-(pi * log_pi.masked_fill(pi == 0, 0.0)).sum(dim=1),
            value=value,
        )

    def loss(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Caption cross-entropy + REINFORCE's policy term ``-(G_t - b_t) log pi(l_t)`` - the
        entropy bonus + the value head's squared error; each a mean over the real target words
        of the captions that sampled their glimpses (+ the cells' reconstruction loss, with
        ``cell_reconstruction``)."""
        if not self.training:  # nothing is sampled in evaluation: the caption loss alone
            return super().loss(images, tokens)
        p_soft = self.soft_probability()
        view = self.observe(images)
        out, tokens, unsampled = self.sample(images, tokens, p_soft, view)
        if self.branch == "word" and not self.probe_caption:  # the first rows' words only
            n = self.samples_per_image
            caption = self.caption_loss(replace(out, word_logits=out.word_logits[::n]), tokens[::n])
        else:
            caption = self.caption_loss(out, tokens)

        mask = out.mask.float()  # (B, n) real target words
        returns = self.returns_of(out, mask)
        entropy = torch.stack([loc.entropy for loc in out.locations], dim=1)
        # The policy-gradient words: real words of captions that sampled their locations (not the
        # expected-context captions of Xu et al.'s trick, not the self-critical argmax paths).
        # Baselines and statistics use only these.
        pg_mask = mask
        if unsampled is not None:
            pg_mask = mask * (~unsampled).float().unsqueeze(1)
        sampled = pg_mask.bool()
        pg_words = mean_count(pg_mask.sum())  # global under torchrun: see rl_attn.distributed
        policy_loss, baseline, value_loss = self.policy_term(out, returns, pg_mask, pg_words)
        mean_entropy = (entropy * pg_mask).sum() / pg_words
        reconstruction = torch.zeros((), device=images.device)
        if self.reconstruction is not None:
            reconstruction = self.reconstruction(images, view.grid)

        total = (
            caption
            + self.cell_reconstruction * reconstruction
            + self.policy_coef * policy_loss
            - self.entropy_coef * mean_entropy
            + self.value_coef * value_loss
        )
        logs = {
            "losses/total": total.item(),
            "losses/caption": caption.item(),
            "losses/policy": policy_loss.item(),
            "losses/entropy": mean_entropy.item(),
            "losses/value": value_loss.item(),
            "losses/reconstruction": reconstruction.item(),
            "charts/policy_entropy": mean_entropy.item(),
            "charts/soft_probability": p_soft,
            **self.env_logs(out),
            **self.return_logs(returns, baseline, sampled),
        }
        return total, logs

    def policy_term(
        self, out: Rollout, returns: torch.Tensor, pg_mask: torch.Tensor, pg_words: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """REINFORCE's ``-(G_t - b_t) log pi(l_t)`` over the ``pg_mask: (B, n)`` words, divided
        by ``pg_words``, or with ``branch=all`` its exact mean over each word's cell; returns
        it, the baseline ``(B, n)`` and the value head's regression loss."""
        if out.every_cell is not None:
            policy_loss, baseline, divisor = all_cells_policy_loss(
                out.every_cell, pg_mask, pg_words, self.normalize_advantage
            )
            # the encoder's share: the expected reward's own gradient (the advantages'
            # standardisation undone on that path), times encoder_policy_grad; the state's
            self._key_factor[0] = self.encoder_policy_grad * float(divisor)
            self._state_factor[0] = self.state_policy_grad * float(divisor)
            return policy_loss, baseline, torch.zeros((), device=returns.device)
        baseline, value_loss = self.baseline_of(out, returns, pg_mask, pg_words)
        advantage = self.advantage_of(returns, baseline, pg_mask.bool())
        log_prob = torch.stack([loc.log_prob for loc in out.locations], dim=1)
        return -(advantage * log_prob * pg_mask).sum() / pg_words, baseline, value_loss

    @property
    def captions_only(self) -> bool:
        """Branching at every word and scoring every cell both need every glimpse's word
        scored: captions only."""
        return self.branch != "episode"

    def sample(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        p_soft: float,
        view: SensorView | None = None,
    ) -> tuple[Rollout, torch.Tensor, torch.Tensor | None]:
        """The training rollout: ``samples_per_image`` glimpse sequences per image (the images
        observed once, as ``view`` when given; siblings adjacent), each caption reading the
        expected context with probability ``p_soft``. Returns the rollout, its tokens (repeated
        per sample) and the rows that add no policy-gradient term: the expected-context rows,
        or the self-critical argmax paths (``None`` when there are none)."""
        self.rollouts += 1
        if self.captions_only and bool((tokens == SILENT).any()):
            raise ValueError(
                f"agent.branch={self.branch} scores each glimpse by its own word, but these "
                "episodes have silent glimpses (classification); use agent.branch=episode"
            )
        if view is None:
            view = self.observe(images)
        if self.branch == "word":
            first = self.init_state(view)
            view, tokens = self.expand(images, tokens, view)
            policy = WordBranches(self, self.samples_per_image, first)
            return self.rollout(images, tokens, view=view, policy=policy), tokens, None
        view, tokens = self.expand(images, tokens, view)
        if self.branch == "all":
            every = AllCells(self, view, tokens, self.scored_cells)
            out = self.rollout(images, tokens, view=view, policy=every)
            return replace(out, every_cell=every.recorded()), tokens, None
        if self.baseline == "self_critical":
            n = self.samples_per_image  # the last path of each image reads the argmax
            greedy = torch.arange(tokens.shape[0], device=tokens.device) % n == n - 1
            policy = SelfCritical(self, greedy)
            return self.rollout(images, tokens, view=view, policy=policy), tokens, greedy
        soft_rows = None
        if p_soft > 0:
            soft_rows = torch.rand(tokens.shape[0], device=tokens.device) < p_soft
        policy = self if soft_rows is None else ExpectedContextMix(self, soft_rows)
        return self.rollout(images, tokens, view=view, policy=policy), tokens, soft_rows

    def expand(
        self, images: torch.Tensor, tokens: torch.Tensor, view: SensorView | None = None
    ) -> tuple[SensorView, torch.Tensor]:
        """The images observed once (``view``, when given, is that observation), each view and
        caption repeated ``samples_per_image`` times (the samples of an image adjacent)."""
        n = self.samples_per_image
        if view is None:
            view = self.observe(images)
        if n > 1:
            view = view.index(
                torch.arange(view.batch_size, device=tokens.device).repeat_interleave(n)
            )
            tokens = tokens.repeat_interleave(n, dim=0)
        return view, tokens

    def baseline_of(
        self, out: Rollout, returns: torch.Tensor, pg_mask: torch.Tensor, pg_words: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The baseline ``b: (B, n)`` subtracted from ``returns`` (no gradient; for each sample
        it never depends on that sample's own glimpse at the same step) and the value head's
        regression loss (zero for the other baselines)."""
        value_loss = torch.zeros((), device=returns.device)
        if self.baseline == "value":
            values = torch.stack([loc.value for loc in out.locations], dim=1)
            value_loss = ((values - returns) ** 2 * pg_mask).sum() / pg_words
            baseline = values.detach()
        elif self.baseline == "leave_one_out":
            n = self.samples_per_image
            per_image = returns.view(-1, n, returns.shape[1])
            others = (per_image.sum(1, keepdim=True) - per_image) / (n - 1)
            baseline = others.reshape_as(returns).detach()
        elif self.baseline == "self_critical":  # each image's last path read the argmax
            n = self.samples_per_image
            per_image = returns.view(-1, n, returns.shape[1])
            baseline = per_image[:, -1:].expand_as(per_image).reshape_as(returns).detach()
        elif self.baseline == "moving_average":
            baseline = self._moving_average(returns, pg_mask)
        else:
            baseline = torch.zeros_like(returns)
        return baseline, value_loss

    def advantage_of(
        self, returns: torch.Tensor, baseline: torch.Tensor, sampled: torch.Tensor
    ) -> torch.Tensor:
        """``returns - baseline`` without gradient, standardised over the ``sampled: (B, n)``
        words of every process with ``normalize_advantage``."""
        advantage = (returns - baseline).detach()
        n_sampled = int(all_sum(sampled.sum()))
        if self.normalize_advantage and n_sampled > 1:
            mean, std = global_mean_std(advantage[sampled], n_sampled)
            advantage = (advantage - mean) / (std + 1e-8)
        return advantage

    def return_logs(
        self, returns: torch.Tensor, baseline: torch.Tensor, sampled: torch.Tensor
    ) -> dict[str, float]:
        """This process's return and advantage statistics (the trainer averages ranks)."""
        if int(sampled.sum()) <= 1:
            return {}
        gap = (returns - baseline)[sampled]
        logs = {
            "charts/return": float(returns[sampled].mean()),
            "charts/baseline": float(baseline[sampled].mean()),
            "charts/advantage_mean": float(gap.mean()),
            "charts/advantage_std": float(gap.std()),
        }
        var = returns[sampled].var()
        if self.baseline == "value" and var > 0:
            logs["charts/explained_variance"] = float(1 - gap.var() / var)
        return logs

    def soft_probability(self) -> float:
        """This update's chance that a caption reads the expected context (Xu et al.'s trick)."""
        final = self.expected_context_prob
        updates, hold, total = int(self.rollouts), self.soft_warmup_hold, self.soft_warmup_steps
        if updates >= total:
            return final
        if updates < hold:
            return 1.0
        done = (updates - hold) / (total - hold)
        return 1.0 - done * (1.0 - final)

    def returns_of(self, out: Rollout, mask: torch.Tensor) -> torch.Tensor:
        """What each glimpse's advantage is measured from, ``(B, n)`` (pads earn 0): the
        reward-to-go ``G_t = sum_{k >= t} gamma^(k-t) r_k``, or with ``gae_lambda`` the
        lambda-return over the value head's (detached) estimates."""
        rewards = out.rewards * mask
        if self.gae_lambda is None:
            return self.reward_to_go(rewards, out.scored)
        values = torch.stack([loc.value for loc in out.locations], dim=1).detach()
        return self.lambda_returns(rewards, values, mask, out.scored)

    def lambda_returns(
        self,
        rewards: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        scored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``G^lambda_t = r_t + d_t ((1 - lambda) V_{t+1} + lambda G^lambda_{t+1})``, ``(B, n)``,
        with ``d_t`` as in :meth:`reward_to_go`; the episode ends after its last real word
        (``mask: (B, n)``), where the next value is 0."""
        lam = float(self.gae_lambda if self.gae_lambda is not None else 1.0)
        discount = self._discounts(rewards, scored)
        next_values = torch.cat([values[:, 1:] * mask[:, 1:], values[:, :1] * 0], dim=1)
        return _backward_returns(rewards, discount, (lam, next_values))

    def _discounts(self, rewards: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
        """``d_t``: ``gamma`` after a scored step, 1 after a silent one."""
        discount = torch.full_like(rewards, self.gamma)
        if scored is not None:
            discount = torch.where(scored, discount, torch.ones_like(discount))
        return discount

    def reward_to_go(
        self, rewards: torch.Tensor, scored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, n)`` rewards -> ``(B, n)`` discounted sums of each reward and those after it,
        ``G_t = r_t + d_t G_{t+1}``. ``d_t`` is ``gamma`` at a step whose prediction is scored
        and 1 at a silent one (``scored: (B, n)`` False: a classification episode's glimpses
        before its class), so ``gamma=0`` credits each glimpse with the next prediction it is
        read for: its own word in a caption, the class in a classification episode."""
        if self.gamma == 1.0:
            return rewards.flip(1).cumsum(1).flip(1)
        return _backward_returns(rewards, self._discounts(rewards, scored))

    @torch.no_grad()
    def _moving_average(self, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The per-position baseline *before* this batch (so it stays independent of the sample
        it is subtracted from), then updated with the batch's mean returns."""
        n = returns.shape[1]
        if n > self.average_return.numel():
            grown = torch.full((n,), float("nan"), device=returns.device)
            grown[: self.average_return.numel()] = self.average_return
            self.average_return = grown
        current = self.average_return[:n]
        # Sums over every rank (the trainer gives all ranks the same caption length n).
        counts = all_sum(mask.sum(0))
        batch_mean = all_sum((returns * mask).sum(0)) / counts.clamp(min=1)
        seen = (counts > 0) & torch.isfinite(batch_mean)  # a NaN batch (then skipped) is not kept
        baseline = torch.nan_to_num(current, nan=0.0).expand_as(returns).clone()
        d = self.moving_average_decay
        updated = torch.where(torch.isnan(current), batch_mean, d * current + (1 - d) * batch_mean)
        self.average_return[:n] = torch.where(seen, updated, current)
        return baseline


class ExpectedContextMix:
    """Xu et al.'s trick as a policy over ``agent``'s modules: the captions of ``soft: (B,)``
    read the expected context (and their attention learns by backprop), the others sample."""

    def __init__(self, agent: ReinforceAgent, soft: torch.Tensor):
        self.agent, self.soft = agent, soft

    def init_state(self, view: SensorView) -> DecoderState:
        return self.agent.init_state(view, self.soft)

    def attention_logits(self, state: DecoderState) -> torch.Tensor:
        return self.agent.attention_logits(state, self.soft)

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        return self.agent.locate(logits, state, self.soft)


class _ScaledGrad(torch.autograd.Function):
    """The identity forward; backward, the gradient times ``factor[0]``, read at backward
    time, so the loss can set it after the forward pass (``encoder_policy_grad`` and
    ``state_policy_grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: list[float]) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor[0], None


class SelfCritical:
    """Self-critical paths as a policy over ``agent``'s modules: the rows of ``greedy: (B,)``
    read the policy's most probable cells, the others sample (their log-probabilities are
    taken under the policy either way, so the rows stay one batch)."""

    def __init__(self, agent: ReinforceAgent, greedy: torch.Tensor):
        self.agent, self.greedy = agent, greedy

    def init_state(self, view: SensorView) -> DecoderState:
        return self.agent.init_state(view)

    def attention_logits(self, state: DecoderState) -> torch.Tensor:
        return self.agent.attention_logits(state)

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        return self.agent.locate(logits, state, greedy=self.greedy)


class WordBranches:
    """The ``n`` samples of each image branch at every word (the *vine* of Schulman et al.
    2015). The rows of an image (adjacent) share one decoder state. At each word every row
    reads its own cells, drawn from the policy at that state, and the environment scores the
    word predicted from them; then every row goes on from the first row's new state. So the
    first row is an ordinary on-policy episode and the others are one-word probes from its
    states: with the ``leave_one_out`` baseline a glimpse is judged against the other glimpses
    tried for the same word from the same state.

    By default the probes only measure: their decoder steps run without autograd (they train
    nothing but the policy, through their log-probabilities), and the caption loss is the first
    rows' (``probe_caption`` trains the captioner on every row's word). The attention scores
    are computed once per image, the keys kept once per image."""

    def __init__(self, agent: ReinforceAgent, n: int, first: DecoderState):
        self.agent, self.n, self.first = agent, n, first

    def init_state(self, view: SensorView) -> DecoderState:
        """The state of ``first`` (one row per image) repeated for every sample; ``view`` is
        the repeated view the environment reads, already summarised in ``first``."""
        f = self.first
        return DecoderState(self._repeat(f.h), self._repeat(f.c), f.keys)

    def attention_logits(self, state: DecoderState) -> torch.Tensor:
        leaders = DecoderState(state.h[:: self.n], state.c[:: self.n], state.keys)
        return self._repeat(self.agent.attention_logits(leaders))

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        return self.agent.locate(logits, state)

    def decoder_step(
        self, state: DecoderState, word: torch.Tensor, context: torch.Tensor, predict: bool = True
    ) -> tuple[DecoderState, torch.Tensor | None]:
        """The decoder's step for every row: the first rows' with autograd, the probes'
        without; every row's new state is its image's first row's."""
        n, rows = self.n, state.h.shape[0]
        step = self.agent.decoder.step
        if self.agent.probe_caption:  # every row with autograd
            new, logits = step(state, word, context, predict)
            carried = DecoderState(self._repeat(new.h[::n]), self._repeat(new.c[::n]), state.keys)
            return carried, logits
        lead = torch.arange(0, rows, n, device=word.device)
        probe = torch.arange(rows, device=word.device).view(-1, n)[:, 1:].flatten()
        new, logits = step(_rows(state, lead), word[lead], context[lead], predict)
        with torch.no_grad():
            _, probe_logits = step(_rows(state, probe), word[probe], context[probe], predict)
        carried = DecoderState(self._repeat(new.h), self._repeat(new.c), state.keys)
        if logits is None:
            return carried, None
        order = torch.cat([lead, probe]).argsort()  # back to the rows' order
        return carried, torch.cat([logits, probe_logits]).index_select(0, order)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.n, dim=0)


def _backward_returns(
    rewards: torch.Tensor,
    discount: torch.Tensor,
    bootstrap: tuple[float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``G_t = r_t + d_t G_{t+1}`` from the last step back, ``(B, n)``; with ``bootstrap =
    (lambda, next_values)`` the lambda-return ``G_t = r_t + d_t ((1 - lambda) V_{t+1} + lambda
    G_{t+1})``."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    lam, next_values = bootstrap if bootstrap is not None else (1.0, None)
    for t in range(rewards.shape[1] - 1, -1, -1):
        ahead = running
        if next_values is not None:
            ahead = (1 - lam) * next_values[:, t] + lam * running
        running = rewards[:, t] + discount[:, t] * ahead
        returns[:, t] = running
    return returns


def _rows(state: DecoderState, rows: torch.Tensor) -> DecoderState:
    """``state``'s ``h`` and ``c`` at ``rows`` (the keys, one per image, are not per row)."""
    return DecoderState(state.h.index_select(0, rows), state.c.index_select(0, rows), state.keys)


def _check_self_critical(
    baseline: str, expected_context_prob: float, soft_warmup_steps: int, branch: str
) -> None:
    """The self-critical baseline pairs each image's sampled paths with its argmax path."""
    if baseline == "self_critical" and (
        expected_context_prob or soft_warmup_steps or branch != "episode"
    ):
        raise ValueError(
            "baseline=self_critical pairs sampled paths with an argmax path: it needs "
            "branch=episode, expected_context_prob=0 and soft_warmup_steps=0"
        )


def _reconstruction(encoder: Encoder, weight: float) -> CellReconstruction | None:
    """The cells' reconstruction loss and its head, with a ``weight`` above 0."""
    if not weight >= 0:
        raise ValueError(f"cell_reconstruction must be >= 0, got {weight}")
    return CellReconstruction(encoder.out_dim) if weight else None


def _check_revisit(
    revisit: bool, expected_context_prob: float, soft_warmup_steps: int, branch: str, test_mode: str
) -> None:
    """``revisit=False`` closes the cells read so far, which only a hard read names."""
    if revisit:
        return
    if expected_context_prob or soft_warmup_steps:
        raise ValueError(
            "revisit=false closes the cells an episode has read, but an expected-context "
            "caption reads every cell; set expected_context_prob=0 and soft_warmup_steps=0"
        )
    if branch != "episode":
        raise ValueError("revisit=false needs branch=episode (a word's probes share one state)")
    if test_mode == "expectation":
        raise ValueError("revisit=false needs a hard read at test time: test_mode argmax or sample")


def _check_gae(gae_lambda: float | None, baseline: str) -> None:
    """One ``ValueError`` line for an impossible ``gae_lambda``."""
    if gae_lambda is None:
        return
    if not 0.0 <= gae_lambda <= 1.0:
        raise ValueError(f"gae_lambda must be in [0, 1] or null, got {gae_lambda}")
    if baseline != "value":
        raise ValueError(f"gae_lambda needs baseline=value (its critic), got baseline={baseline}")


def _check_branch(
    branch: str, samples: int, gamma: float, expected_context_prob: float, warmup: int
) -> None:
    """One ``ValueError`` line for an impossible ``branch`` setting."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of auto, {', '.join(BRANCHES)}, got {branch!r}")
    if branch == "episode":
        return
    if branch == "word" and samples < 2:
        raise ValueError(f"branch=word needs samples_per_image >= 2, got {samples}")
    if gamma != 0:
        raise ValueError(
            f"branch={branch} needs gamma=0 (a word's cells are scored on that word alone), "
            f"got gamma={gamma}"
        )
    if expected_context_prob > 0 or warmup > 0:
        raise ValueError(
            f"branch={branch} samples every glimpse: set expected_context_prob=0 and "
            "soft_warmup_steps=0 (Xu et al.'s mix is agent=reinforce_xu)"
        )


def _check_all_cells(
    branch: str, baseline: str, samples: int, cells_per_step: int, scored: int | None
) -> None:
    """``branch=all`` averages over one cell per word and brings its own baseline."""
    if scored is not None and (
        not isinstance(scored, int) or isinstance(scored, bool) or scored < 1
    ):
        raise ValueError(f"scored_cells must be null or a positive integer, got {scored!r}")
    if branch != "all":
        return
    if baseline != "none":
        raise ValueError(
            f"branch=all subtracts the policy's expected reward over the cells; set "
            f"baseline=none, got baseline={baseline}"
        )
    if samples != 1 or cells_per_step != 1:
        raise ValueError(
            f"branch=all scores every cell for one episode per image reading one cell per word: "
            f"set samples_per_image=1 and cells_per_step=1, got {samples} and {cells_per_step}"
        )


# the policy gradient's shares beyond the attention MLP (ReinforceAgent's arguments)
OUTER_POLICY_GRADS = ("encoder_policy_grad", "state_policy_grad")


def auto_outer_policy_grad(
    scale: float | str, branch: str, detach_policy_input: bool
) -> float | str:
    """What ``encoder_policy_grad=auto`` and ``state_policy_grad=auto`` mean for the settled
    ``branch``: 0.3 with ``all`` (the encoder, or the LSTM, learns from the scored cells'
    policy term at 0.3 times the expected reward's own gradient; RESULTS, issue 14, "An eighth
    session" and "A ninth session") when the policy's input is detached, else 0. Other values
    pass through unchanged."""
    if scale != "auto":
        return scale
    return 0.3 if branch == "all" and detach_policy_input else 0.0


def _outer_policy_grad(
    name: str, scale: float | str, branch: str, detach_policy_input: bool
) -> float:
    """The share ``name`` (one of :data:`OUTER_POLICY_GRADS`) settled and checked: ``auto`` or
    a number >= 0, above 0 only with ``branch=all`` and a detached policy input."""
    value = auto_outer_policy_grad(scale, branch, detach_policy_input)
    if isinstance(value, (str, bool)) or not value >= 0:
        raise ValueError(f"{name} must be auto or a number >= 0, got {scale!r}")
    if value > 0 and branch != "all":
        raise ValueError(
            f"{name} > 0 needs branch=all (it scales the scored cells' policy term); set "
            f"{name}=0 with branch={branch}"
        )
    if value > 0 and not detach_policy_input:
        raise ValueError(
            f"{name} > 0 scales the policy gradient beyond the attention MLP, which "
            "detach_policy_input=false already lets through unscaled; set one of them"
        )
    return float(value)


def auto_estimator(asked: Mapping[str, Any], grid_captions: bool) -> tuple[str, str]:
    """What ``branch=auto`` and ``baseline=auto`` mean, given the :class:`ReinforceAgent`
    arguments ``asked`` (by name): every cell scored at every word (``branch=all``, the best
    estimator measured: benchmarks/RESULTS.md) wherever it applies, which is captions over
    the feature grid (``grid_captions``) with per-word credit (``gamma=0``), one path per
    image reading one cell per word, revisits allowed, every glimpse sampled (no Xu et al.'s
    expected context, no soft warm-up) and no baseline other than ``none`` asked for; else
    ``branch=episode``. The baseline: ``none`` with ``all`` (it brings its own), ``value``
    otherwise. Other values pass through unchanged."""
    branch, baseline = asked["branch"], asked["baseline"]
    if branch == "auto":
        one_cell = asked["samples_per_image"] == 1 and asked["cells_per_step"] == 1
        sampled = not (asked["expected_context_prob"] or asked["soft_warmup_steps"])
        fits = grid_captions and asked["gamma"] == 0 and one_cell and asked["revisit"]
        fits = fits and sampled and baseline in ("auto", "none")
        branch = "all" if fits else "episode"
    if baseline == "auto":
        baseline = "none" if branch == "all" else "value"
    return branch, baseline


def auto_policy_rate(scale: float | str, branch: str) -> float | str:
    """What ``policy_lr_scale=auto`` means for the settled ``branch``: 0.5 with ``all`` (the
    scored cells' exact policy term; half the rate gained on captions over the grid), 1 with
    the others (over patches, with the episode estimator, 0.5 did worse). Other values pass
    through unchanged."""
    if scale != "auto":
        return scale
    return 0.5 if branch == "all" else 1.0


def _policy_rate(scale: float | str, branch: str) -> float:
    """``policy_lr_scale`` settled for ``branch`` and checked: ``auto`` or a number > 0."""
    rate = auto_policy_rate(scale, branch)
    if isinstance(rate, str) or not rate > 0:
        raise ValueError(f"policy_lr_scale must be auto or a number > 0, got {scale!r}")
    return float(rate)


def _draw_log_prob(log_pi: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Log-probability ``(B,)`` of drawing ``cells: (B, k)`` in this order without replacement
    from ``pi``: each draw's probability renormalised over the cells not yet drawn."""
    picked = log_pi.gather(1, cells)
    if cells.shape[1] == 1:
        return picked.squeeze(1)
    # log of the mass not yet drawn before draw i, as a logsumexp over the remaining cells
    # (1 - cumsum(pi) would round to 0 in float32 once the first draw holds almost all mass)
    remaining = log_pi
    total = picked[:, 0]
    for i in range(1, cells.shape[1]):
        remaining = remaining.scatter(1, cells[:, i - 1 : i], float("-inf"))
        total = total + picked[:, i] - torch.logsumexp(remaining, dim=1)
    return total


def global_mean_std(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation of ``x`` pooled over all ranks (``n`` values)."""
    if not distributed.active():
        return x.mean(), x.std()
    moments = all_sum(torch.stack([x.sum(), (x * x).sum()]))
    mean = moments[0] / n
    var = (moments[1] - n * mean * mean) / (n - 1)
    return mean, var.clamp(min=0).sqrt()
