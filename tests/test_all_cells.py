"""``agent.branch=all``: every cell's reward at every word, and the exact policy gradient."""

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_reinforce import (
    BEST,
    D,
    GridAsImage,
    L,
    V,
    bandit_batch,
    caption_bandit,
    make_agent,
    train_bandit,
)

from rl_attn.agents import ReinforceAgent, all_cells
from rl_attn.agents.all_cells import ScoredCells, all_cells_policy_loss, sum_and_sample
from rl_attn.decoder import Decoder
from rl_attn.envs.sensors import PatchSensor
from rl_attn.errors import UserError
from rl_attn.trainer import make_optimizer


def all_cells_agent(**kwargs):
    return make_agent(branch="all", baseline="none", gamma=0.0, **{"scored_cells": None, **kwargs})


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("gate", [True, False])
def test_every_cell_step_is_the_step_on_each_cell(cell, gate):
    torch.manual_seed(0)
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, gate=gate, cell=cell).eval()
    grid = torch.randn(3, L, D)
    state = decoder.init_state(grid)
    state, _ = decoder.step(state, torch.tensor([1, 4, 5]), grid[:, 2])  # a state past the first
    word = torch.tensor([4, 5, 3])
    every = decoder.step_every_cell(state, word, decoder.cell_inputs(grid))
    for i in range(L):
        _, logits = decoder.step(state, word, grid[:, i])
        torch.testing.assert_close(every[:, i], logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scored", [2, None])
def test_padding_words_are_not_scored_and_the_rest_unchanged(scored):
    """Captions of different lengths: the cells of a caption's padding are not run through the
    decoder (reward 0, masked in the loss); every real word's rewards, and the random draws,
    are those of the same captions with the padding replaced by words."""
    grid, tokens = bandit_batch(6, torch.Generator().manual_seed(3))
    tokens = torch.cat([tokens, torch.full((6, 2), 4)], dim=1)  # 4 target words per caption
    tokens[:3, 2], tokens[:3, 3:] = 2, 0  # the first three end after one word
    filled = tokens.clone()
    filled[:3, 3:] = 5
    recorded = []
    for t in (tokens, filled):
        agent = all_cells_agent(scored_cells=scored)
        torch.manual_seed(7)
        out, _, _ = agent.sample(grid, t, 0.0)
        recorded.append(out.every_cell)
    padded, full = recorded
    real = (tokens[:, 1:] != 0).unsqueeze(2)
    torch.testing.assert_close(padded.rewards * real, full.rewards * real)
    assert (padded.rewards[:3, 2:] == 0).all() and (full.rewards[:3, 2:] != 0).all()
    if scored is not None:
        assert torch.equal(padded.cells * real, full.cells * real)
        torch.testing.assert_close(padded.weights * real, full.weights * real)


@pytest.mark.parametrize("scored", [2, None])
def test_scoring_in_small_chunks_gives_the_rewards_of_one_chunk(scored, monkeypatch):
    """The words' cells are scored after the rollout in chunks of rows; chunks that cut
    through an image's words (and a padded caption) change no reward and no draw."""
    grid, tokens = bandit_batch(6, torch.Generator().manual_seed(4))
    tokens = torch.cat([tokens, torch.full((6, 2), 4)], dim=1)
    tokens[:2, 3:] = 0
    recorded = []
    for rows in (10**6, 7):
        monkeypatch.setattr(all_cells, "_SCORED_ROWS", rows)
        agent = all_cells_agent(scored_cells=scored)
        torch.manual_seed(5)
        out, _, _ = agent.sample(grid, tokens, 0.0)
        recorded.append(out.every_cell)
    one, chunked = recorded
    torch.testing.assert_close(chunked.rewards, one.rewards, atol=1e-6, rtol=1e-6)
    assert (one.rewards[tokens[:, 1:] != 0] != 0).all()
    if scored is not None:
        assert torch.equal(chunked.cells, one.cells)


def test_recorded_rewards_are_what_the_environment_pays_for_each_cell():
    agent = all_cells_agent()
    grid, tokens = bandit_batch(16, torch.Generator().manual_seed(1))
    out, _, _ = agent.sample(grid, tokens, 0.0)
    log_pi, rewards = out.every_cell.log_pi, out.every_cell.rewards
    assert log_pi.shape == rewards.shape == (16, tokens.shape[1] - 1, L)
    assert log_pi.requires_grad and not rewards.requires_grad
    # the sampled cell's recorded reward is the environment's reward for that word
    cells = torch.stack([loc.action for loc in out.locations], dim=1)
    paid = rewards.gather(2, cells.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(paid[out.mask], out.rewards[out.mask], atol=1e-5, rtol=1e-5)
    # and the cells differ: only BEST tells the first word
    assert (rewards[:, 0].std(dim=1) > 0).all()


def test_policy_term_is_the_exact_gradient_of_the_expected_reward():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, L, generator=gen, requires_grad=True)
    rewards = torch.randn(4, 3, L, generator=gen)
    mask = torch.tensor([[1.0, 1, 0]] * 4)
    loss, expected, _ = all_cells_policy_loss(
        ScoredCells(logits.log_softmax(2), rewards), mask, mask.sum(), normalize=False
    )
    (estimate,) = torch.autograd.grad(loss, logits)
    pi = logits.softmax(2)
    objective = ((pi * rewards).sum(2) * mask).sum() / mask.sum()
    (exact,) = torch.autograd.grad(-objective, logits)
    torch.testing.assert_close(estimate, exact)
    torch.testing.assert_close(expected, (pi * rewards).sum(2).detach())
    # normalised, it points the same way
    scored = ScoredCells(logits.log_softmax(2), rewards)
    loss, _, _ = all_cells_policy_loss(scored, mask, mask.sum(), normalize=True)
    (scaled,) = torch.autograd.grad(loss, logits)
    cosine = torch.nn.functional.cosine_similarity(scaled.flatten(), exact.flatten(), dim=0)
    assert cosine > 0.9999


def test_a_reward_weighted_by_the_sample_alone_is_caught():
    """The check above fails an estimator that forgets to weight each cell by its probability
    (it would climb toward cells the policy rarely reads as fast as toward likely ones)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, L, generator=gen, requires_grad=True)
    rewards = torch.randn(2, 1, L, generator=gen)
    log_pi = logits.log_softmax(2)
    unweighted = -((rewards - rewards.mean(2, keepdim=True)) * log_pi).sum() / 2
    (wrong,) = torch.autograd.grad(unweighted, logits)
    (exact,) = torch.autograd.grad(-(logits.softmax(2) * rewards).sum() / 2, logits)
    assert not torch.allclose(wrong, exact, atol=1e-3)


def test_only_the_policy_learns_from_the_policy_term():
    agent = all_cells_agent()
    grid, tokens = bandit_batch(8, torch.Generator().manual_seed(4))
    out, _, _ = agent.sample(grid, tokens, 0.0)
    loss, _, _ = all_cells_policy_loss(out.every_cell, out.mask.float(), out.mask.sum(), True)
    loss.backward()
    for name, p in agent.decoder.named_parameters():
        touched = p.grad is not None and bool(p.grad.any())
        assert touched == name.startswith(("att_grid", "att_hidden", "att_score")), name


def test_all_cells_learns_the_bandit():
    agent = all_cells_agent()
    first = train_bandit(agent, steps=1)
    last = train_bandit(agent, steps=200)
    assert last["charts/policy_entropy"] < first["charts/policy_entropy"] - 0.5
    out, tokens = caption_bandit(agent)
    assert (out.weights[:, 0].argmax(dim=1) == BEST).float().mean() > 0.95
    assert (out.tokens[:, 0] == tokens[:, 1]).float().mean() > 0.95


def test_all_cells_options_are_clear_errors():
    with pytest.raises(ValueError, match="branch=all .* set baseline=none, got baseline=value"):
        make_agent(branch="all", baseline="value", gamma=0.0)
    with pytest.raises(ValueError, match=r"branch=all needs gamma=0 .* got gamma=1.0"):
        make_agent(branch="all", baseline="none")
    with pytest.raises(ValueError, match="set samples_per_image=1 and cells_per_step=1"):
        all_cells_agent(cells_per_step=2)
    with pytest.raises(ValueError, match="revisit=false needs branch=episode"):
        all_cells_agent(revisit=False)
    agent = all_cells_agent()
    assert agent.captions_only  # the trainer refuses it a classification task
    grid, tokens = bandit_batch(4, torch.Generator().manual_seed(7))
    tokens[:, 1] = -1  # a silent glimpse, then the class
    with pytest.raises(ValueError, match="agent.branch=all scores each glimpse by its own word"):
        agent.loss(grid, tokens)


def sum_and_sample_gradient(logits, rewards, m, draws, tail_weight=None):
    """The mean of the sum-and-sample policy gradient over ``draws`` draws of the tail cell,
    from ``rewards`` known for every cell; ``tail_weight`` replaces the draw's weight (to
    build a wrong estimator)."""
    total = torch.zeros_like(logits)
    b, n, _ = logits.shape
    mask = torch.ones(b, n)
    for _ in range(draws):
        log_pi = logits.log_softmax(2)
        cells, weights = sum_and_sample(log_pi.detach().exp().view(b * n, -1), m)
        cells, weights = cells.view(b, n, -1), weights.view(b, n, -1)
        if tail_weight is not None:
            weights = torch.cat([weights[..., :-1], tail_weight(log_pi, cells)], dim=2)
        scored = ScoredCells(log_pi, rewards.gather(2, cells), cells, weights)
        loss, _, _ = all_cells_policy_loss(scored, mask, mask.sum(), normalize=False)
        (grad,) = torch.autograd.grad(loss, logits)
        total += grad
    return total / draws


def test_sum_and_sample_is_unbiased_and_a_wrong_tail_weight_is_caught():
    torch.manual_seed(5)
    logits = (torch.randn(3, 2, L) * 1.5).requires_grad_()
    rewards = torch.randn(3, 2, L)
    (exact,) = torch.autograd.grad(-(logits.softmax(2) * rewards).sum() / 6, logits)
    mean = sum_and_sample_gradient(logits, rewards, m=3, draws=3000)
    cosine = torch.nn.functional.cosine_similarity(mean.flatten(), exact.flatten(), dim=0)
    assert cosine > 0.99
    assert mean.norm().item() == pytest.approx(exact.norm().item(), rel=0.1)

    def own_probability(log_pi, cells):  # the drawn cell weighted by its own pi: too small
        return log_pi.detach().exp().gather(2, cells[..., -1:])

    wrong = sum_and_sample_gradient(logits, rewards, m=3, draws=3000, tail_weight=own_probability)
    cosine = torch.nn.functional.cosine_similarity(wrong.flatten(), exact.flatten(), dim=0)
    assert cosine < 0.99 or wrong.norm().item() != pytest.approx(exact.norm().item(), rel=0.1)


def test_sum_and_sample_scores_the_top_cells_and_one_of_the_rest():
    pi = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04], [1.0, 0.0, 0.0, 0.0, 0.0]])
    for _ in range(20):
        cells, weights = sum_and_sample(pi, 2)
        assert cells[0, :2].tolist() == [0, 1] and cells[1, 0] == 0
        assert cells[0, 2] in (2, 3, 4)
        torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.3, 0.2]))
        assert weights[1, 2] == 0  # no mass left: the draw counts for nothing


def test_scored_cells_learns_the_bandit_and_checks_its_option():
    agent = all_cells_agent(scored_cells=2)
    grid, tokens = bandit_batch(8, torch.Generator().manual_seed(8))
    out, _, _ = agent.sample(grid, tokens, 0.0)
    assert out.every_cell.rewards.shape == (8, tokens.shape[1] - 1, 3)
    train_bandit(agent, steps=200)
    out, tokens = caption_bandit(agent)
    assert (out.tokens[:, 0] == tokens[:, 1]).float().mean() > 0.95
    with pytest.raises(ValueError, match="scored_cells must be null or a positive integer"):
        all_cells_agent(scored_cells=0)
    with pytest.raises(ValueError, match="scored_cells must be null or a positive integer"):
        make_agent(scored_cells=True)
    assert make_agent(scored_cells=4).branch == "episode"  # read by branch=all alone


@pytest.mark.parametrize(
    ("settings", "patch", "classification", "settled"),
    [
        ({}, False, False, ("all", "none")),
        ({"baseline": "none"}, False, False, ("all", "none")),
        ({}, True, False, ("episode", "value")),
        ({}, False, True, ("episode", "value")),
        ({"gamma": 1.0}, False, False, ("episode", "value")),
        ({"cells_per_step": 2}, False, False, ("episode", "value")),
        ({"revisit": False}, False, False, ("episode", "value")),
        ({"soft_warmup_steps": 900}, False, False, ("episode", "value")),
        ({"baseline": "moving_average"}, False, False, ("episode", "moving_average")),
        ({"baseline": "leave_one_out", "samples_per_image": 4}, False, False,
         ("episode", "leave_one_out")),
        ({"branch": "word", "samples_per_image": 2}, False, False, ("word", "value")),
        ({"branch": "episode", "baseline": "none"}, False, False, ("episode", "none")),
    ],
)  # fmt: skip
def test_auto_settles_on_every_cell_wherever_it_applies(settings, patch, classification, settled):
    got = ReinforceAgent.resolve_auto(settings, patch=patch, classification=classification)
    assert (got["branch"], got["baseline"]) == settled


def test_the_class_defaults_are_the_yaml_defaults():
    yaml = OmegaConf.load(Path(__file__).parents[1] / "configs" / "agent" / "reinforce.yaml")
    defaults = inspect.signature(ReinforceAgent.__init__).parameters
    settings = {k: v for k, v in OmegaConf.to_container(yaml).items() if k != "_target_"}
    assert settings == {k: defaults[k].default for k in settings}
    assert set(defaults) - set(settings) == {"self", "encoder", "decoder"}


def test_default_agent_scores_four_cells_and_settles_to_episodes_over_patches():
    torch.manual_seed(0)
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    agent = ReinforceAgent(GridAsImage(), decoder)
    assert (agent.branch, agent.baseline, agent.scored_cells) == ("all", "none", 4)
    assert agent.value_head is None
    agent.use_sensor(PatchSensor(D, cells=4, patch_size=8, gist_dim=5, gist_kernel=1))
    assert (agent.branch, agent.baseline) == ("episode", "value")
    assert agent.value_head is not None and agent.value_head.in_features == 16
    asked = ReinforceAgent(GridAsImage(), decoder, branch="all", baseline="none")
    with pytest.raises(UserError, match="agent.branch=all .* needs sensor=grid"):
        asked.use_sensor(PatchSensor(D, cells=4, patch_size=8, gist_dim=5, gist_kernel=1))
    with pytest.raises(ValueError, match="branch must be one of auto, episode, word, all"):
        ReinforceAgent(GridAsImage(), decoder, branch="vine")
    with pytest.raises(ValueError, match="baseline must be one of auto, none, moving_average"):
        ReinforceAgent(GridAsImage(), decoder, baseline="critic")


def test_the_policy_learns_at_its_share_of_the_rate_and_the_rest_at_the_rate():
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    agent = ReinforceAgent(GridAsImage(), decoder)
    assert agent.policy_lr_scale == 0.5  # auto with branch=all (benchmarks/RESULTS.md, issue 14)
    rest, policy = agent.param_groups(0.01)
    policy_ids = {id(p) for p in agent.policy_parameters()}
    assert {id(p) for p in policy["params"]} == policy_ids and policy["lr"] == 0.005
    assert policy_ids.isdisjoint(id(p) for p in rest["params"])
    assert len(rest["params"]) + len(policy["params"]) == len(list(agent.parameters()))
    optimizer = make_optimizer(agent.param_groups(0.01), 0.01, 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.005, 0.0025]
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    for p in agent.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step moves every weight by its group's rate
    schedule.step()
    for n, p in agent.named_parameters():
        moved = (before[n] - p.detach()).abs().max().item()
        expected = 0.0025 if id(p) in policy_ids else 0.005
        assert moved == pytest.approx(expected, rel=1e-3), n


@pytest.mark.parametrize(
    ("kwargs", "patch", "rate"),
    [
        ({}, False, 0.5),  # auto: branch all
        ({}, True, 1.0),  # auto settled over patches: the episode estimator
        ({"branch": "episode"}, False, 1.0),
        ({"policy_lr_scale": 0.25}, True, 0.25),  # a number passes through
        ({"policy_lr_scale": 2.0, "branch": "episode"}, False, 2.0),
    ],
)  # fmt: skip
def test_auto_policy_rate_follows_the_settled_estimator(kwargs, patch, rate):
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    agent = ReinforceAgent(GridAsImage(), decoder, **kwargs)
    if patch:
        agent.use_sensor(PatchSensor(D, cells=4, patch_size=8, gist_dim=5, gist_kernel=1))
    assert agent.policy_lr_scale == rate
    assert len(agent.param_groups(0.01)) == (1 if rate == 1.0 else 2)
    settled = ReinforceAgent.resolve_auto(kwargs, patch=patch, classification=False)
    assert settled["policy_lr_scale"] == rate


@pytest.mark.parametrize("scale", [0, -1.0, "fast"])
def test_a_bad_policy_rate_is_one_line_of_error(scale):
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    with pytest.raises(ValueError, match="policy_lr_scale must be auto or a number > 0"):
        ReinforceAgent(GridAsImage(), decoder, policy_lr_scale=scale)


OUTER = ["encoder_policy_grad", "state_policy_grad"]


def outer_gradients(normalize: bool, name: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of one update's loss on what the share ``name`` reaches (the grid, the
    encoder's output, for ``encoder_policy_grad``; the LSTM's recurrent weights for
    ``state_policy_grad``) and on the attention MLP's score weights, the other share 0, with
    the same draws for every setting."""
    shares = dict.fromkeys(OUTER, 0.0) | {name: scale}
    agent = all_cells_agent(scored_cells=2, normalize_advantage=normalize, **shares)
    grid, tokens = bandit_batch(8, torch.Generator().manual_seed(2))
    grid.requires_grad_(True)
    torch.manual_seed(5)
    loss, _ = agent.loss(grid, tokens)
    loss.backward()
    reached = grid if name == "encoder_policy_grad" else agent.decoder.lstm.weight_hh
    return reached.grad, agent.decoder.att_score.weight.grad


@pytest.mark.parametrize("name", OUTER)
def test_a_share_gets_the_unstandardised_policy_gradient_at_its_scale(name):
    """The policy term reaches the encoder through the keys (or the LSTM through the state)
    at the share's multiple of the expected reward's own gradient: linear in the scale, the
    same whether the advantages are standardised or not; the attention MLP's step does not
    depend on the scale."""
    caption_only, mlp0 = outer_gradients(True, name, 0.0)
    one, mlp1 = outer_gradients(True, name, 1.0)
    two, _ = outer_gradients(True, name, 2.0)
    raw_caption_only, raw_mlp = outer_gradients(False, name, 0.0)
    raw_one, _ = outer_gradients(False, name, 1.0)
    policy = one - caption_only
    size = policy.abs().max()
    assert size > 1e-3 * caption_only.abs().max()
    close = {"rtol": 1e-3, "atol": 1e-3 * float(size)}  # at the scale of the share's gradient
    torch.testing.assert_close(two - caption_only, 2 * policy, **close)
    torch.testing.assert_close(raw_one - raw_caption_only, policy, **close)
    torch.testing.assert_close(raw_caption_only, caption_only, **close)
    torch.testing.assert_close(mlp1, mlp0)
    assert not torch.allclose(raw_mlp, mlp0)  # the standardisation does set the MLP's step


@pytest.mark.parametrize("name", OUTER)
@pytest.mark.parametrize(
    ("kwargs", "patch", "scale"),
    [
        ({}, False, 0.3),  # auto: branch all
        ({}, True, 0.0),  # auto settled over patches: the episode estimator
        ({"branch": "episode"}, False, 0.0),
        ({"detach_policy_input": False}, False, 0.0),
        ({"NAME": 0.25}, False, 0.25),  # a number passes through
        ({"NAME": 0}, True, 0.0),
    ],
)  # fmt: skip
def test_an_auto_share_follows_the_settled_estimator(name, kwargs, patch, scale):
    kwargs = {name if k == "NAME" else k: v for k, v in kwargs.items()}
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    agent = ReinforceAgent(GridAsImage(), decoder, **kwargs)
    if patch:
        agent.use_sensor(PatchSensor(D, cells=4, patch_size=8, gist_dim=5, gist_kernel=1))
    assert getattr(agent, name) == scale
    settled = ReinforceAgent.resolve_auto(kwargs, patch=patch, classification=False)
    assert settled[name] == scale


@pytest.mark.parametrize("name", OUTER)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"NAME": -1.0}, "NAME must be auto or a number >= 0"),
        ({"NAME": "fast"}, "NAME must be auto or a number >= 0"),
        ({"NAME": 1.0, "branch": "episode"}, "NAME > 0 needs branch=all"),
        ({"NAME": 1.0, "detach_policy_input": False}, "set one of them"),
    ],
)
def test_a_bad_share_is_one_line_of_error(name, kwargs, message):
    kwargs = {name if k == "NAME" else k: v for k, v in kwargs.items()}
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    with pytest.raises(ValueError, match=message.replace("NAME", name)):
        ReinforceAgent(GridAsImage(), decoder, **kwargs)


@pytest.mark.parametrize("name", OUTER)
def test_a_share_asked_for_over_patches_is_one_line_of_error(name):
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    agent = ReinforceAgent(GridAsImage(), decoder, **{name: 0.5})
    with pytest.raises(UserError, match=f"agent.{name} > 0 needs branch=all"):
        agent.use_sensor(PatchSensor(D, cells=4, patch_size=8, gist_dim=5, gist_kernel=1))


def test_policy_confidence_benchmark_reads_a_trained_default_run(tmp_path, trained_run):
    """``benchmarks/policy_confidence.py``: shares in [0, 1] that fall as the threshold
    rises; a run whose agent scores no cells (soft) is refused."""
    from conftest import benchmark_module, compose_config

    from rl_attn.trainer import train

    bench = benchmark_module("policy_confidence")
    train(compose_config("agent=reinforce", "trainer.max_steps=10"), tmp_path)
    rows = bench.confidence(str(tmp_path / "checkpoints" / "last.pt"), scenes=32, seed=0)
    assert [p for p, _, _ in rows] == list(bench.THRESHOLDS)
    for column in (1, 2):
        shares = [row[column] for row in rows]
        assert all(0.0 <= x <= 1.0 for x in shares)
        assert shares == sorted(shares, reverse=True)
    with pytest.raises(SystemExit, match="does not score cells"):
        bench.confidence(str(trained_run / "checkpoints" / "last.pt"), scenes=8, seed=0)


def test_policy_confidence_benchmark_names_a_missing_checkpoint_in_one_line(tmp_path):
    from conftest import assert_one_line_error, run_benchmark

    proc = run_benchmark("policy_confidence", str(tmp_path / "missing.pt"))
    assert_one_line_error(proc, "error: checkpoint")
