"""The REINFORCE agent: gradients go where they should, and it learns where to look."""

import pytest
import torch

from rl_attn.agents import ReinforceAgent
from rl_attn.decoder import Decoder
from rl_attn.encoder import Encoder

L, V = 9, 7
D = L + 1  # a one-hot of the cell position, then the informative feature
BEST = 5  # the only informative cell of the bandit


class GridAsImage(Encoder):
    """The 'image' is already the grid: (B, L, D) in, (B, L, D) out, nothing to learn."""

    out_dim = D

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def bandit_batch(b: int, generator: torch.Generator):
    """Captions of one word (4 or 5, then <end>); only cell BEST says which word it is."""
    words = torch.randint(4, 6, (b,), generator=generator)
    grid = torch.randn(b, L, D, generator=generator) * 0.1
    grid[:, :, :L] += torch.eye(L)
    grid[torch.arange(b), BEST, L] = (words == 4).float() * 2 - 1
    tokens = torch.stack([torch.ones(b, dtype=torch.long), words, torch.full((b,), 2)], dim=1)
    return grid, tokens


def make_agent(seed=0, **kwargs) -> ReinforceAgent:
    torch.manual_seed(seed)
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    # These tests were written for the full reward-to-go and the plain softmax (gamma=1 and
    # temperature=1, the defaults until 2026-11-30); a test of another setting says so itself.
    return ReinforceAgent(GridAsImage(), decoder, **{"gamma": 1.0, "temperature": 1.0, **kwargs})


SAMPLER = ("att_grid", "att_hidden", "att_score")


def sampler_params(agent):
    return {n: p for n, p in agent.decoder.named_parameters() if n.startswith(SAMPLER)}


def test_location_sampler_gets_gradient_only_from_the_policy_loss():
    agent = make_agent(entropy_coef=0.0)
    grid, tokens = bandit_batch(32, torch.Generator().manual_seed(0))
    out = agent.rollout(grid, tokens)
    caption = agent.caption_loss(out, tokens)
    grads = torch.autograd.grad(caption, list(sampler_params(agent).values()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # no path through the sample

    agent.zero_grad()
    loss, _ = agent.loss(grid, tokens)
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in sampler_params(agent).values()
    )


def test_policy_gradient_trains_only_the_attention_mlp():
    agent = make_agent()
    grid, tokens = bandit_batch(16, torch.Generator().manual_seed(6))
    out = agent.rollout(grid, tokens)
    log_prob = torch.stack([loc.log_prob for loc in out.locations], 1)
    shared = [p for n, p in agent.decoder.named_parameters() if not n.startswith(SAMPLER)]
    grads = torch.autograd.grad(log_prob.sum(), shared, allow_unused=True)
    assert all(g is None for g in grads)  # LSTM, embeddings, output layers: untouched


def test_expected_context_rows_train_the_encoder_through_attention_sampled_rows_do_not():
    agent = make_agent()
    grid, _ = bandit_batch(8, torch.Generator().manual_seed(7))
    grid.requires_grad_()
    soft = torch.tensor([True, False] * 4)  # as loss() draws it in a mixed batch
    state = agent.init_state(agent.observe(grid), soft)
    logits = agent.attention_logits(state, soft)
    (grad,) = torch.autograd.grad(logits.sum(), grid)
    per_row = grad.abs().flatten(1).sum(1)
    assert (per_row[0::2] > 0).all()  # Xu et al.'s rows: backprop through keys and state
    assert (per_row[1::2] == 0).all()  # sampling rows: the policy stops at the attention MLP


def two_word_batch(b: int, generator: torch.Generator):
    """Captions "w 6": only cell BEST says which word w is, and the word 6 is always the same.
    Every other cell holds a random +-1 in BEST's feature, so the grid's mean (the decoder's
    initial state) says little about w: to name w the agent must choose where to look."""
    grid, tokens = bandit_batch(b, generator)
    feature = torch.randint(0, 2, (b, L), generator=generator).float() * 2 - 1
    feature[:, BEST] = grid[:, BEST, L]
    grid[:, :, L] = feature
    six = torch.full((b, 1), 6)
    tokens = torch.cat([tokens[:, :2], six, tokens[:, 2:]], dim=1)  # <start> w 6 <end>
    return grid, tokens


def test_each_location_is_credited_with_the_word_it_is_read_for():
    # gamma=0: a location earns only the reward of its own word. Were rewards shifted by one
    # step, the location chosen for w would be credited with the constant word 6 and would not
    # learn where w can be read (measured: w right for about 65% of images instead of 100%).
    # (The policy sees every cell, so it may also name w by where it looks, not only at BEST.)
    agent = make_agent(gamma=0.0)
    opt = torch.optim.Adam(agent.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = agent.loss(*two_word_batch(64, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    agent.eval()
    grid, tokens = two_word_batch(256, torch.Generator().manual_seed(98))
    out = agent.caption(grid, max_len=3)
    assert (out.tokens[:, 0] == tokens[:, 1]).float().mean() > 0.95


def test_reward_and_baseline_carry_no_gradient():
    agent = make_agent(baseline="value", value_coef=0.0)
    grid, tokens = bandit_batch(32, torch.Generator().manual_seed(1))
    out = agent.rollout(grid, tokens)
    assert not out.rewards.requires_grad
    values = torch.stack([loc.value for loc in out.locations], 1)
    # the value head reads a detached decoder state: its regression cannot change the decoder
    grads = torch.autograd.grad(values.sum(), list(agent.decoder.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    # with value_coef=0 the value head gets no gradient: the baseline is detached in the loss
    loss, _ = agent.loss(grid, tokens)
    loss.backward()
    assert agent.value_head.weight.grad is None or agent.value_head.weight.grad.abs().sum() == 0


def train_bandit(agent, steps=300, seed=0):
    opt = torch.optim.Adam(agent.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, logs = agent.loss(*bandit_batch(64, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logs


def caption_bandit(agent):
    """The trained agent's greedy captions of 256 new bandit images, and their targets."""
    agent.eval()
    grid, tokens = bandit_batch(256, torch.Generator().manual_seed(99))
    return agent.caption(grid, max_len=2), tokens


@pytest.mark.parametrize(
    "options",
    [
        {"baseline": "moving_average"},
        {"baseline": "value"},
        {"baseline": "leave_one_out", "samples_per_image": 4},
    ],
)
def test_converges_to_the_best_cell_of_a_bandit(options):
    agent = make_agent(**options)
    train_bandit(agent, steps=300)
    out, tokens = caption_bandit(agent)
    looked = out.weights[:, 0].argmax(dim=1)
    assert (looked == BEST).float().mean() > 0.95
    assert (out.tokens[:, 0] == tokens[:, 1]).float().mean() > 0.95


def policy_gradient_variance(agent, batches=40):
    """Total variance over batches of the policy-gradient estimate on the sampler's weights."""
    gen = torch.Generator().manual_seed(123)
    samples = []
    for _ in range(batches):
        agent.zero_grad()
        loss, _ = agent.loss(*bandit_batch(16, gen))
        loss.backward()
        samples.append(agent.decoder.att_score.weight.grad.flatten().clone())
    return torch.stack(samples).var(dim=0).sum().item()


def test_baselines_reduce_gradient_variance():
    variances = {}
    for seed in range(3):
        agent = make_agent(seed=seed, baseline="value", entropy_coef=0.0)
        agent.normalize_advantage = False  # compare the raw estimators
        # fit the value head alone, so the policy the estimators are measured on stays fixed
        opt = torch.optim.Adam(agent.value_head.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(100):
            loss, _ = agent.loss(*bandit_batch(64, gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
        agent.value_coef = 0.0
        for baseline in ("none", "moving_average", "value"):
            agent.baseline = baseline
            if baseline == "moving_average":
                agent.average_return.fill_(float("nan"))
                policy_gradient_variance(agent, batches=10)  # warm the average up
            variances.setdefault(baseline, []).append(policy_gradient_variance(agent))
    mean = {k: sum(v) / len(v) for k, v in variances.items()}
    assert mean["moving_average"] < mean["none"]
    assert mean["value"] < mean["none"]


def test_test_time_modes():
    agent = make_agent(test_mode="argmax")
    agent.eval()
    grid, _ = bandit_batch(8, torch.Generator().manual_seed(2))
    a = agent.caption(grid, max_len=2)
    b = agent.caption(grid, max_len=2)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.weights.sum(-1), torch.ones_like(a.weights.sum(-1)))
    assert set(a.weights.unique().tolist()) <= {0.0, 1.0}  # one-hot: hard
    agent.test_mode = "expectation"
    soft = agent.caption(grid, max_len=2)
    assert (soft.weights > 0).all()  # the expectation reads everywhere
    agent.test_mode = "sample"
    torch.manual_seed(0)
    draws = torch.stack([agent.caption(grid, max_len=1).weights.argmax(-1) for _ in range(10)])
    assert len(draws.unique()) > 1


def test_expected_context_trick_trains_attention_by_backprop():
    agent = make_agent(expected_context_prob=1.0, entropy_coef=0.0)
    grid, tokens = bandit_batch(16, torch.Generator().manual_seed(3))
    loss, logs = agent.loss(grid, tokens)
    assert logs["losses/policy"] == 0.0  # no caption sampled a location
    loss.backward()
    assert agent.decoder.att_score.weight.grad.abs().sum() > 0


def test_soft_warmup_anneals_the_expected_context_probability():
    agent = make_agent(soft_warmup_steps=10, expected_context_prob=0.2)
    assert agent.soft_probability() == 1.0
    grid, tokens = bandit_batch(8, torch.Generator().manual_seed(4))
    for _ in range(5):
        _, logs = agent.loss(grid, tokens)
    assert int(agent.rollouts) == 5
    assert agent.soft_probability() == pytest.approx(0.6)
    agent.rollouts.fill_(50)
    assert agent.soft_probability() == pytest.approx(0.2)
    assert "rollouts" in agent.state_dict()  # the schedule resumes from a checkpoint
    agent.eval()
    loss, logs = agent.loss(grid, tokens)  # evaluation: the caption loss alone
    assert int(agent.rollouts) == 50 and "losses/policy" not in logs


def test_soft_warmup_hold_keeps_every_caption_soft_then_falls():
    agent = make_agent(soft_warmup_steps=10, soft_warmup_hold=0.6, expected_context_prob=0.0)
    probabilities = []
    for updates in range(12):
        agent.rollouts.fill_(updates)
        probabilities.append(agent.soft_probability())
    assert probabilities == pytest.approx([1.0] * 6 + [1.0, 0.75, 0.5, 0.25] + [0.0, 0.0])
    step = make_agent(soft_warmup_steps=4, soft_warmup_hold=1.0)  # a single switch
    step.rollouts.fill_(3)
    assert step.soft_probability() == 1.0
    step.rollouts.fill_(4)
    assert step.soft_probability() == 0.0
    with pytest.raises(ValueError, match=r"soft_warmup_hold must be in \[0, 1\], got 1.5"):
        make_agent(soft_warmup_steps=4, soft_warmup_hold=1.5)


def test_several_samples_per_image_share_one_encoding():
    agent = make_agent(baseline="leave_one_out", samples_per_image=3, normalize_advantage=False)
    seen = []
    agent.encoder.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    grid, tokens = bandit_batch(5, torch.Generator().manual_seed(5))
    loss, logs = agent.loss(grid, tokens)
    assert seen == [5]  # encoded once, not once per sample
    assert torch.isfinite(loss)
    # each sample's baseline is the mean return of its siblings, so advantages average to 0
    assert logs["charts/advantage_mean"] == pytest.approx(0.0, abs=1e-6)


def test_word_branches_learn_the_bandit():
    # The words, not the cell: on this bandit a policy may also tell the word by *which* cell
    # it picks (its scores see the informative feature of cell BEST through the keys), and
    # with branch=word it did so on seed 0, looking at BEST for one word only (as the
    # estimators above do on seed 1); every one of them gets the words right.
    agent = make_agent(baseline="leave_one_out", samples_per_image=4, branch="word", gamma=0.0)
    first = train_bandit(agent, steps=1)
    last = train_bandit(agent, steps=300)
    assert last["charts/policy_entropy"] < first["charts/policy_entropy"] - 0.5
    out, tokens = caption_bandit(agent)
    assert (out.tokens[:, 0] == tokens[:, 1]).float().mean() > 0.95


def test_word_branches_share_the_first_samples_state_and_train_only_the_policy():
    k = 3
    agent = make_agent(baseline="leave_one_out", samples_per_image=k, branch="word", gamma=0.0)
    grid, tokens = bandit_batch(6, torch.Generator().manual_seed(6))
    out, repeated, _ = agent.sample(grid, tokens, 0.0)
    probes = torch.arange(len(repeated)) % k != 0
    cells = out.locations[0].action
    assert len(set(cells.view(-1, k).flatten().tolist())) > 1  # the rows read their own cells
    # every row's word is scored from its own glimpse: the rewards of an image's rows differ
    assert not torch.equal(out.rewards[probes], out.rewards[~probes].repeat_interleave(k - 1, 0))
    # the probes' decoder steps ran without autograd, the first rows' with it
    weight = agent.decoder.lstm.weight_ih
    (lead,) = torch.autograd.grad(out.word_logits[~probes].sum(), weight, retain_graph=True)
    (probe,) = torch.autograd.grad(out.word_logits[probes].sum(), weight, allow_unused=True)
    assert lead.abs().sum() > 0 and (probe is None or not probe.any())
    # the caption loss is the first rows' cross-entropy
    loss, logs = agent.loss(grid, tokens)
    assert torch.isfinite(loss) and logs["charts/advantage_mean"] == pytest.approx(0, abs=1e-5)


def test_probe_captions_train_the_captioner_on_every_row():
    k = 3
    agent = make_agent(
        baseline="leave_one_out", samples_per_image=k, branch="word", gamma=0.0, probe_caption=True
    )
    grid, tokens = bandit_batch(6, torch.Generator().manual_seed(6))
    out, _, _ = agent.sample(grid, tokens, 0.0)
    probes = torch.arange(out.word_logits.shape[0]) % k != 0
    (probe,) = torch.autograd.grad(out.word_logits[probes].sum(), agent.decoder.lstm.weight_ih)
    assert probe.abs().sum() > 0


def test_word_branches_refuse_a_classification_episode():
    agent = make_agent(baseline="leave_one_out", samples_per_image=2, branch="word", gamma=0.0)
    grid, tokens = bandit_batch(4, torch.Generator().manual_seed(7))
    tokens[:, 1] = -1  # a silent glimpse, then the class
    with pytest.raises(ValueError, match="agent.branch=word scores each glimpse by its own word"):
        agent.loss(grid, tokens)


def test_lambda_returns_span_monte_carlo_and_one_step_td():
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0  # a caption of 3 words: the episode ends there
    rewards = rewards * mask
    gamma = 0.9
    agent = make_agent(gamma=gamma, gae_lambda=1.0)
    torch.testing.assert_close(
        agent.lambda_returns(rewards, values, mask), agent.reward_to_go(rewards)
    )
    nxt = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(3, 1)], dim=1)
    agent.gae_lambda = 0.0  # the advantage is the TD error r_t + gamma V_{t+1} - V_t
    torch.testing.assert_close(agent.lambda_returns(rewards, values, mask), rewards + gamma * nxt)
    lam = 0.7  # GAE's definition written out: A_t = sum_k (gamma lam)^k delta_{t+k}
    agent.gae_lambda = lam
    delta = (rewards + gamma * nxt - values) * mask
    gae = torch.stack(
        [sum((gamma * lam) ** (k - t) * delta[:, k] for k in range(t, 5)) for t in range(5)], 1
    )
    torch.testing.assert_close(
        agent.lambda_returns(rewards, values, mask) * mask, (gae + values) * mask
    )


def test_gae_drives_the_advantage_and_the_value_target():
    agent = make_agent(baseline="value", gae_lambda=0.0, normalize_advantage=False, gamma=0.5)
    grid, tokens = bandit_batch(8, torch.Generator().manual_seed(4))
    out, _, _ = agent.sample(grid, tokens, 0.0)
    mask = out.mask.float()
    values = torch.stack([loc.value for loc in out.locations], dim=1).detach()
    expected = agent.lambda_returns(out.rewards * mask, values, mask)
    torch.testing.assert_close(agent.returns_of(out, mask), expected)
    agent.gae_lambda = None
    torch.testing.assert_close(agent.returns_of(out, mask), agent.reward_to_go(out.rewards * mask))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"gae_lambda must be in \[0, 1\] or null, got 1.5"):
        make_agent(gae_lambda=1.5)
    with pytest.raises(ValueError, match="gae_lambda needs baseline=value .* got baseline=none"):
        make_agent(gae_lambda=0.9, baseline="none")
    with pytest.raises(ValueError, match="one of auto, episode, word, all, got 'vine'"):
        make_agent(branch="vine")
    with pytest.raises(ValueError, match="branch=word needs samples_per_image >= 2, got 1"):
        make_agent(branch="word", gamma=0.0)
    with pytest.raises(ValueError, match=r"branch=word needs gamma=0 .* got gamma=1.0"):
        make_agent(branch="word", samples_per_image=2, baseline="leave_one_out")
    with pytest.raises(ValueError, match="set expected_context_prob=0 and soft_warmup_steps=0"):
        make_agent(branch="word", samples_per_image=2, gamma=0.0, expected_context_prob=0.5)
    with pytest.raises(ValueError, match="baseline must be one of auto, none, moving_average"):
        make_agent(baseline="critic")
    with pytest.raises(ValueError, match="test_mode must be one of"):
        make_agent(test_mode="mean")
    with pytest.raises(ValueError, match="leave_one_out"):
        make_agent(baseline="leave_one_out", samples_per_image=1)


def test_moving_average_baseline_ignores_a_non_finite_batch():
    agent = make_agent(baseline="moving_average")
    mask = torch.ones(4, 3)
    agent._moving_average(torch.ones(4, 3), mask)
    agent._moving_average(torch.full((4, 3), float("nan")), mask)  # a step the trainer skips
    assert torch.equal(agent.average_return[:3], torch.ones(3))
    baseline = agent._moving_average(torch.zeros(4, 3), mask)
    assert torch.equal(baseline, torch.ones(4, 3))


def test_per_word_credit_gives_a_classification_episodes_glimpses_their_class():
    # gamma=0 credits a glimpse with the next prediction it is read for: in a caption every step
    # is scored (its own word), in a classification episode the silent glimpses before the class
    # all earn the class's reward; a plain discount would leave them with nothing to learn from.
    agent = make_agent(gamma=0.0)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.5, 0.25, 0.0, 0.0]])
    scored = torch.tensor([[False, False, False, True], [True, True, True, False]])
    returns = agent.reward_to_go(rewards, scored)
    assert returns.tolist() == [[1.0, 1.0, 1.0, 1.0], [0.5, 0.25, 0.0, 0.0]]
    assert agent.reward_to_go(rewards).tolist() == rewards.tolist()  # every step scored
    half = make_agent(gamma=0.5).reward_to_go(rewards, scored)
    assert half.tolist() == [[1.0, 1.0, 1.0, 1.0], [0.625, 0.25, 0.0, 0.0]]


def test_self_critical_paths_read_the_argmax_and_are_the_baseline(monkeypatch):
    agent = make_agent(baseline="self_critical", samples_per_image=3, normalize_advantage=False)
    grid, tokens = bandit_batch(40, torch.Generator().manual_seed(3))
    seen = {}
    original = agent.baseline_of

    def spy(out, returns, pg_mask, pg_words):
        seen.update(out=out, returns=returns, pg_mask=pg_mask)
        return original(out, returns, pg_mask, pg_words)

    monkeypatch.setattr(agent, "baseline_of", spy)
    agent.loss(grid, tokens)
    out, returns, pg_mask = seen["out"], seen["returns"], seen["pg_mask"]
    logits = agent.decoder.attention_logits(agent.init_state(agent.observe(grid)))
    first = out.weights[:, 0].argmax(-1).view(40, 3)
    assert first[:, 2].tolist() == logits.argmax(-1).tolist()  # the last path: the argmax
    assert len(set(first[:, 0].tolist())) > 1  # the others sample
    assert pg_mask.view(40, 3, -1)[:, 2].sum() == 0  # the argmax path has no policy term
    baseline, _ = original(out, returns, pg_mask, pg_mask.sum())
    per_image = returns.view(40, 3, -1)
    torch.testing.assert_close(baseline.view(40, 3, -1), per_image[:, 2:].expand(40, 3, -1))
    for bad in ({"samples_per_image": 1}, {"expected_context_prob": 0.5}):
        with pytest.raises(ValueError, match="self_critical"):
            make_agent(baseline="self_critical", **{"samples_per_image": 2, **bad})
