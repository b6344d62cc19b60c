import pytest
import torch
import torch.nn.functional as F

from rl_attn.agents import SoftAttentionAgent
from rl_attn.decoder import Decoder
from rl_attn.encoder import ConvEncoder
from rl_attn.envs.glimpse import GlimpseCaptionVectorEnv

B, L, D, V = 3, 16, 5, 9
TOKENS = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 2, 0, 0], [1, 7, 8, 4, 2]])  # 3, 2 and 4 words


def make_env(**kwargs):
    torch.manual_seed(0)
    env = GlimpseCaptionVectorEnv(L, D, V, max_words=8, **kwargs)
    grid = torch.randn(B, L, D, requires_grad=True)
    obs, info = env.reset(options={"grid": grid, "tokens": TOKENS})
    return env, grid, obs, info


def test_spaces_and_reset():
    env, grid, obs, info = make_env()
    assert env.num_envs == B
    assert env.single_action_space["location"].n == L
    assert obs["glimpse"].shape == (B, D) and (obs["glimpse"] == 0).all()
    assert set(obs) == {"glimpse", "word"}
    assert obs["word"].tolist() == [1, 1, 1]
    assert torch.equal(info["targets"], TOKENS[:, 1:])


def test_hard_episode_reads_one_cell_per_word_and_ends_after_the_last_word():
    env, grid, obs, _ = make_env()
    cells = torch.tensor([3, 0, 15])
    obs, reward, term, _, info = env.step({"location": cells, "prediction": None})
    assert torch.equal(obs["glimpse"], grid[torch.arange(B), cells])
    assert reward.tolist() == [0, 0, 0] and not term.any()
    ends = []
    for t in range(1, 5):
        logits = torch.randn(B, V)
        obs, reward, term, _, info = env.step({"location": cells, "prediction": logits})
        expected = F.log_softmax(logits, 1)[torch.arange(B), TOKENS[:, t]] * info["active"]
        assert torch.allclose(reward, expected)
        assert obs["word"].tolist() == TOKENS[:, t].tolist()
        ends.append(term.tolist())
    assert [e[0] for e in ends] == [False, False, True, True]  # 3 words: ends at step 3
    assert [e[1] for e in ends] == [False, True, True, True]
    assert info["cells_read"].tolist() == [3, 2, 4]


def test_soft_location_reads_every_cell_and_is_differentiable():
    env, grid, _, _ = make_env()
    logits = torch.randn(B, L, requires_grad=True)
    weights = torch.softmax(logits, 1)
    obs, *_ = env.step({"location": weights, "prediction": None})
    assert torch.allclose(obs["glimpse"], (weights.unsqueeze(-1) * grid).sum(1), atol=1e-6)
    obs["glimpse"].sum().backward()
    assert logits.grad.abs().sum() > 0 and grid.grad.abs().sum() > 0
    _, _, _, _, info = env.step({"location": weights, "prediction": torch.randn(B, V)})
    assert info["cells_read"].tolist() == [2 * L, 2 * L, 2 * L]


def test_rewards_carry_no_gradient_and_correct_reward():
    env, *_ = make_env(reward="correct")
    env.step({"location": torch.zeros(B, dtype=torch.long), "prediction": None})
    logits = torch.randn(B, V, requires_grad=True)
    right = F.one_hot(TOKENS[:, 1], V).float() * 10 + logits
    _, reward, *_ = env.step({"location": torch.zeros(B, dtype=torch.long), "prediction": right})
    assert reward.tolist() == [1.0, 1.0, 1.0] and not reward.requires_grad
    words = torch.tensor([0, TOKENS[1, 2], 0])
    _, reward, *_ = env.step({"location": torch.zeros(B, dtype=torch.long), "prediction": words})
    assert reward.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "location, prediction, message",
    [
        (
            torch.tensor([0, 16, 1]),
            None,
            r"location 16 is outside the location space Discrete\(16\)",
        ),
        (torch.tensor([0, -1, 1]), None, r"location -1 is outside"),
        (
            torch.zeros(B, 4),
            None,
            r"location has shape \(3, 4\), expected \(3,\), \(3, k\) or \(3, 16\)",
        ),
        (torch.zeros(B, 2, dtype=torch.long), None, "reads the same cell twice"),
        (torch.zeros(B, 17, dtype=torch.long), None, "17 cells per step is more than"),
        (torch.full((B, L), float("nan")), None, "must be finite floats"),
        (torch.full((B, L), 0.5), None, "sum to 1"),
        (torch.tensor([0.0, 1.0, 2.0]), None, "must be integers"),
        (
            torch.tensor([0, 1, 2]),
            torch.tensor([0, 9, 1]),
            r"prediction 9 is outside the prediction space Discrete\(9\)",
        ),
        (torch.tensor([0, 1, 2]), torch.full((B, V), float("nan")), "contain NaN"),
        (torch.tensor([0, 1, 2]), torch.zeros(B, 2), r"prediction has shape \(3, 2\)"),
    ],
)
def test_bad_actions_name_the_space(location, prediction, message):
    env, *_ = make_env()
    if prediction is not None:
        env.step({"location": torch.zeros(B, dtype=torch.long), "prediction": None})
    with pytest.raises(ValueError, match=message):
        env.step({"location": location, "prediction": prediction})


def test_bad_reset():
    env = GlimpseCaptionVectorEnv(L, D, V)
    with pytest.raises(ValueError, match="reset needs options"):
        env.reset()
    with pytest.raises(ValueError, match=r"grid must have shape \(B, 16, 5\)"):
        env.reset(options={"grid": torch.zeros(2, 3, 5), "tokens": TOKENS[:2]})


def test_soft_agent_through_the_env_matches_the_direct_computation():
    torch.manual_seed(0)
    encoder = ConvEncoder(channels=(8, 16), strides=(2, 2))
    agent = SoftAttentionAgent(
        encoder, Decoder(V, encoder.out_dim, embed_dim=8, hidden_dim=16, attn_dim=8)
    )
    agent.eval()  # no dropout: the two computations must agree exactly
    images = torch.randint(0, 256, (B, 3, 16, 16), dtype=torch.uint8)
    out = agent.rollout(images, TOKENS)

    grid = agent.encoder(images)
    state = agent.decoder.init_state(grid)
    direct, maps = [], []
    for t in range(TOKENS.shape[1] - 1):
        alpha = torch.softmax(agent.decoder.attention_logits(state), 1)
        context = torch.einsum("bl,bld->bd", alpha, grid)
        state, logits = agent.decoder.step(state, TOKENS[:, t], context)
        direct.append(logits)
        maps.append(alpha)
    # after its <end> an episode reads nothing, so compare the real words
    real = out.mask
    assert torch.allclose(out.word_logits[real], torch.stack(direct, 1)[real], atol=1e-6)
    assert torch.allclose(out.weights[real], torch.stack(maps, 1)[real], atol=1e-6)
    # and the loss's gradient reaches the attention MLP through the environment
    agent.train()
    agent.decoder.dropout.p = 0.0
    loss, _ = agent.loss(images, TOKENS)
    loss.backward()
    assert agent.decoder.att_score.weight.grad.abs().sum() > 0
