"""The patch sensor (glimpses encoded on demand), K glimpses per word, and the cost accounting."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from rl_attn.agents import ReinforceAgent, SoftAttentionAgent
from rl_attn.agents.reinforce import _draw_log_prob
from rl_attn.cost import PeakMemory, flop_split, measure_cost
from rl_attn.decoder import Decoder
from rl_attn.encoder import ConvEncoder
from rl_attn.envs.glimpse import GlimpseCaptionVectorEnv
from rl_attn.envs.sensors import GridSensor, PatchSensor
from rl_attn.errors import UserError

V, B, N_WORDS = 12, 6, 5


def make(cls, sensor: str = "patch", scales: int = 2, **kwargs):
    torch.manual_seed(0)
    encoder = ConvEncoder(channels=(8, 16), strides=(2, 2))
    if sensor == "patch":
        sense = PatchSensor(encoder.out_dim, cells=4, patch_size=16, scales=scales, gist_dim=8)
    else:
        sense = GridSensor()
    decoder = Decoder(
        V, encoder.out_dim, embed_dim=8, hidden_dim=16, attn_dim=8, key_dim=sense.key_dim(encoder)
    )
    agent = cls(encoder, decoder, **kwargs)
    agent.use_sensor(sense)
    return agent.eval()


def batch(n_words: int = N_WORDS):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g)
    tokens = torch.randint(4, V, (B, n_words + 1), generator=g)
    tokens[:, 0] = 1  # <start>
    return images, tokens


@pytest.mark.parametrize("scales", [1, 2])
def test_patch_glimpse_equals_encoding_the_cropped_region(scales):
    agent = make(SoftAttentionAgent, scales=scales)
    sensor, encoder = agent.sensor, agent.encoder
    images, _ = batch()
    view = agent.observe(images)
    cells = torch.tensor([5, 0, 15, 10, 6, 9])  # interior cells and corners (zero padding)
    with torch.no_grad():
        glimpse = view.read(cells)
        for i, cell in enumerate(cells.tolist()):
            r, c = divmod(cell, 4)
            cy, cx = r * 8 + 4, c * 8 + 4  # 8-pixel cells of a 32-pixel image
            feats = []
            for s in range(scales):
                half = 16 * 2**s // 2
                padded = F.pad(images[i : i + 1].float() / 255, (half, half, half, half))
                crop = padded[:, :, cy : cy + 2 * half, cx : cx + 2 * half]  # centred on the cell
                crop = F.avg_pool2d(crop, 2**s) if s else crop
                feats.append(encoder(crop).mean(dim=1))
            expected = torch.cat(feats, dim=1)
            if sensor.combine is not None:
                expected = sensor.combine(expected)
            expected = expected + sensor.where.weight[cell]
            assert torch.allclose(glimpse[i], expected[0], atol=1e-5)


def encoder_flops(agent, tokens=None):
    images, toks = batch()
    return flop_split(agent, images, tokens=toks if tokens is None else tokens)["encoder"]


def test_patch_sensor_flops_scale_linearly_in_k():
    flops = {k: encoder_flops(make(ReinforceAgent, cells_per_step=k)) for k in (1, 2, 4, 8)}
    per_glimpse = (flops[2] - flops[1]) / N_WORDS  # one more cell per word
    gist = flops[1] - N_WORDS * per_glimpse
    assert per_glimpse > 0 and 0 < gist < per_glimpse
    for k, f in flops.items():
        assert f == pytest.approx(gist + k * N_WORDS * per_glimpse, rel=1e-9)


def test_hard_encoder_flops_within_k_over_l_of_soft():
    soft = encoder_flops(make(SoftAttentionAgent))
    hard = encoder_flops(make(ReinforceAgent))
    k, n_cells = N_WORDS, 16
    assert hard <= 1.1 * k / n_cells * soft
    # the grid sensor encodes the whole image whatever is read
    grid_soft = encoder_flops(make(SoftAttentionAgent, sensor="grid"))
    grid_hard = encoder_flops(make(ReinforceAgent, sensor="grid"))
    assert grid_hard == grid_soft > 0


def test_finished_episodes_encode_nothing():
    agent = make(ReinforceAgent)
    images, tokens = batch()
    full = encoder_flops(agent, tokens)
    short = tokens.clone()
    short[:3, 3:] = 0  # half the captions end after two words: 2 reads instead of 5
    per_read = (full - encoder_flops(agent, tokens[:, :1].repeat(1, 2))) / (B * (N_WORDS - 1))
    assert encoder_flops(agent, short) == pytest.approx(full - per_read * 3 * 3, rel=1e-9)


@pytest.mark.parametrize("sensor", ["grid", "patch"])
def test_soft_reads_every_cell_hard_one_per_step(sensor):
    images, tokens = batch()
    n_cells = 16 if sensor == "patch" else make(SoftAttentionAgent, sensor).grid_shape(32)[0] ** 2
    with torch.no_grad():
        soft = make(SoftAttentionAgent, sensor).rollout(images, tokens)
        hard = make(ReinforceAgent, sensor).rollout(images, tokens)
        three = make(ReinforceAgent, sensor, cells_per_step=3).rollout(images, tokens)
    assert soft.cells_read.tolist() == [N_WORDS * n_cells] * B
    assert hard.cells_read.tolist() == [N_WORDS] * B
    assert three.cells_read.tolist() == [3 * N_WORDS] * B
    assert torch.allclose(three.weights.sum(dim=2), torch.ones(B, N_WORDS))
    assert ((three.weights > 0).sum(dim=2) == 3).all()


def test_soft_path_through_patch_sensor_is_differentiable():
    agent = make(SoftAttentionAgent).train()
    images, tokens = batch()
    loss, _ = agent.loss(images, tokens)
    loss.backward()
    for name in ("encoder.net.0.weight", "sensor.gist.0.weight", "sensor.where.weight"):
        grad = dict(agent.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_k_draws_have_the_plackett_luce_probability():
    agent = make(ReinforceAgent, cells_per_step=2).train()
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    state = agent.init_state(agent.observe(torch.zeros(1, 3, 32, 32)))
    p = torch.softmax(logits, dim=1)[0]
    total = 0.0
    loc = agent.locate(logits, state)
    for a, b in itertools.permutations(range(4), 2):
        cells = torch.tensor([[a, b]])
        lp = _draw_log_prob(torch.log_softmax(logits, 1), cells)
        assert float(lp.exp()) == pytest.approx(float(p[a] * p[b] / (1 - p[a])), rel=1e-5)
        total += float(lp.exp())
    assert total == pytest.approx(1.0, rel=1e-5)  # a distribution over ordered pairs
    assert loc.action.shape == (1, 2) and loc.action[0, 0] != loc.action[0, 1]
    agent.eval()
    top = agent.locate(logits, state)
    assert top.action.tolist() == [[2, 0]]  # the two most probable cells, in order
    assert top.weights.tolist() == [[0.5, 0.0, 0.5, 0.0]]


def test_draw_log_prob_stays_exact_for_a_sharp_policy():
    logits = torch.zeros(1, 64)
    logits[0, 0] = 25.0  # the first draw holds all but 1e-9 of the mass in float32
    lp = _draw_log_prob(torch.log_softmax(logits, 1), torch.tensor([[0, 5]]))
    p = torch.softmax(logits.double(), 1)[0]
    assert float(lp) == pytest.approx(float(torch.log(p[0] * p[5] / (1 - p[0]))), rel=1e-5)


def test_too_many_glimpses_and_too_big_patches_are_clear_errors():
    agent = make(ReinforceAgent, cells_per_step=17)
    images, tokens = batch()
    with pytest.raises(ValueError, match="agent.cells_per_step=17 is more than the 16 cells"):
        agent.rollout(images, tokens)
    env = GlimpseCaptionVectorEnv(16, 4, V)
    env.reset(options={"grid": torch.randn(B, 16, 4), "tokens": tokens})
    with pytest.raises(ValueError, match="reads the same cell twice"):
        env.step({"location": torch.tensor([[1, 1]] * B), "prediction": None})
    sensor = PatchSensor(16, cells=4, patch_size=64)
    with pytest.raises(UserError, match="patch_size=64 is larger than the 32-pixel images"):
        sensor.observe(ConvEncoder(), images)
    with pytest.raises(UserError, match="does not divide"):
        PatchSensor(16, cells=5).check_image_size(ConvEncoder(), 32)
    with pytest.raises(UserError, match="sensor.scales must be a positive integer"):
        PatchSensor(16, scales=0)


def test_flop_split_counts_the_soft_weighted_sum_as_attention():
    soft = make(SoftAttentionAgent, sensor="grid")
    hard = make(ReinforceAgent, sensor="grid")
    images, tokens = batch()
    s = flop_split(soft, images, tokens=tokens)
    h = flop_split(hard, images, tokens=tokens)
    n_cells, dim = soft.grid_shape(32)[0] ** 2, soft.encoder.out_dim
    # soft's glimpse is a (1 x L) @ (L x D) matmul per word; hard's is a gather (no FLOPs)
    assert s["attention"] - h["attention"] == pytest.approx(N_WORDS * 2 * n_cells * dim)
    assert s["encoder"] == h["encoder"] and s["decoder"] == h["decoder"]
    assert s["other"] == 0 and s["total"] == pytest.approx(
        s["encoder"] + s["attention"] + s["decoder"]
    )


def test_peak_memory_counts_live_tensors():
    with PeakMemory() as m:
        x = torch.zeros(1000, 250)  # 1 MB
        y = x + 1  # 2 MB live
        del x
        z = y * 2  # 2 MB live again
        view = z[:10]  # a view holds no new memory
    assert m.peak == 2 * 10**6
    assert view.shape == (10, 250)
    weight = torch.randn(1000, 1000)  # made before the block: views of it cost nothing
    with PeakMemory() as m:
        out = F.linear(torch.ones(1, 1000), weight)  # transposes the weight (a view)
        part = weight[:10]
        sparse = torch.eye(3).to_sparse()  # no storage to track: skipped, not an error
    assert m.peak == 4000 + 4000  # the row of ones and the output row, both alive at once
    assert out.shape == (1, 1000) and part.shape == (10, 1000) and sparse.is_sparse


def test_measure_cost_reports_every_figure():
    agent = make(ReinforceAgent)
    images, _ = batch()
    cost = measure_cost(agent, images, max_len=6, large_batch=B, single_images=2, repeats=1)
    for key in ("flops_encoder", "flops_attention", "flops_decoder", "flops_total"):
        assert cost[key] > 0
    assert 1 <= cost["cells_read"] == cost["words"] <= 6
    assert cost["latency_b1_ms"] > 0 and cost["latency_batch_ms"] > 0
    assert cost["peak_memory_mb"] > 0
    assert cost["parameters"] == sum(p.numel() for p in agent.parameters())
