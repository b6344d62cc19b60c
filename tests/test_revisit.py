"""``agent.revisit=false``: an episode reads no cell twice until it has read every cell."""

import pytest
import torch
from conftest import assert_one_line_error, run_module

from rl_attn.agents import GumbelAgent, RandomGlimpseAgent, ReinforceAgent
from rl_attn.decoder import Decoder
from rl_attn.encoder import Encoder

L, V, D = 6, 9, 7  # cells, vocabulary, feature size
ORDER = [4, 1, 5, 0, 3, 2]  # cells from the highest fixed score down


class GridAsImage(Encoder):
    out_dim = D

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def make(cls, monkeypatch=None, **kwargs):
    """A ``cls`` agent over ``L`` cells; with ``monkeypatch``, scores fixed in ``ORDER``."""
    torch.manual_seed(0)
    decoder = Decoder(V, D, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    agent = cls(GridAsImage(), decoder, **kwargs)
    if monkeypatch is not None:
        scores = torch.zeros(L)
        scores[ORDER] = torch.arange(L, 0, -1, dtype=torch.float) * 3.0

        def fixed(state, *args):
            return scores.expand(state.h.shape[0], L).clone()

        monkeypatch.setattr(agent, "attention_logits", fixed)
    return agent


def grids(b: int) -> torch.Tensor:
    return torch.randn(b, L, D, generator=torch.Generator().manual_seed(1))


def tokens(b: int, words: int) -> torch.Tensor:
    body = torch.randint(3, V, (b, words), generator=torch.Generator().manual_seed(2))
    return torch.cat([torch.ones(b, 1, dtype=torch.long), body], dim=1)


def cells_of(weights: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` the cell each step read, from one-hot maps ``(B, T, L)``."""
    assert bool(((weights > 0).sum(-1) == 1).all())
    return weights.argmax(-1)


@pytest.mark.parametrize("revisit", [True, False])
def test_argmax_reads_the_cells_in_score_order_and_reopens_them_when_all_are_read(
    monkeypatch, revisit
):
    agent = make(ReinforceAgent, monkeypatch, revisit=revisit).eval()
    classes = torch.arange(3, V)
    read = cells_of(agent.classify(grids(2), L + 2, classes).weights)
    expected = ORDER + ORDER[:2] if not revisit else [ORDER[0]] * (L + 2)
    assert read.tolist() == [expected, expected]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_captions_read_no_cell_twice(monkeypatch, beam_size):
    agent = make(ReinforceAgent, monkeypatch, revisit=False).eval()
    captions = agent.caption(grids(3), max_len=L, beam_size=beam_size)
    for row, words in zip(cells_of(captions.weights), captions.tokens):
        steps = int((words != 0).sum())  # the words of a caption (a finished one pads)
        assert row[:steps].tolist() == ORDER[:steps]


@pytest.mark.parametrize(
    ("cls", "kwargs", "training"),
    [
        (ReinforceAgent, {"temperature": 1.0}, True),
        (ReinforceAgent, {"temperature": 1.0, "test_mode": "sample"}, False),
        (RandomGlimpseAgent, {}, True),
        (GumbelAgent, {}, True),
        (GumbelAgent, {"test_mode": "sample"}, False),
    ],
    ids=["reinforce-train", "reinforce-sample", "random", "gumbel-train", "gumbel-sample"],
)
def test_sampled_episodes_read_distinct_cells(cls, kwargs, training):
    agent = make(cls, revisit=False, **kwargs).train(training)
    b = 200
    if training:
        out = agent.rollout(grids(b), tokens(b, L))
        read = cells_of(out.weights)
    else:
        read = cells_of(agent.classify(grids(b), L, torch.arange(3, V)).weights)
    assert all(len(set(row)) == L for row in read.tolist())
    # and with revisits allowed, the same draws do repeat cells (so the check can fail)
    agent = make(cls, **kwargs).train(training)
    if training:
        read = cells_of(agent.rollout(grids(b), tokens(b, L)).weights)
    else:
        read = cells_of(agent.classify(grids(b), L, torch.arange(3, V)).weights)
    assert any(len(set(row)) < L for row in read.tolist())


def test_no_revisit_training_loss_and_gradients_are_finite():
    agent = make(ReinforceAgent, revisit=False, temperature=0.25, entropy_coef=0.01)
    loss, logs = agent.loss(grids(16), torch.cat([tokens(16, L), torch.full((16, 1), 2)], 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in agent.parameters() if p.grad is not None)
    assert 0 < logs["charts/policy_entropy"] < torch.log(torch.tensor(float(L)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expected_context_prob": 0.5}, "revisit=false closes the cells"),
        ({"soft_warmup_steps": 10}, "revisit=false closes the cells"),
        ({"test_mode": "expectation"}, "revisit=false needs a hard read"),
    ],
)
def test_no_revisit_refuses_soft_reads(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(ReinforceAgent, revisit=False, **kwargs)


def test_no_revisit_with_xu_recipe_is_a_one_line_error(tmp_path):
    proc = run_module(
        "rl_attn.train", "agent=reinforce_xu", "agent.revisit=false", "trainer.max_steps=2",
        "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(
        proc, "error: cannot build agent rl_attn.agents.ReinforceAgent: revisit=false closes"
    )
