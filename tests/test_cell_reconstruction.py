"""``agent.cell_reconstruction``: each cell's vector reconstructs its own square of the image."""

import pytest
import torch
from test_reinforce import V

from rl_attn.agents import PPOAgent, ReinforceAgent
from rl_attn.agents.cell_reconstruction import CellReconstruction, grid_shape_of, square_pixels
from rl_attn.decoder import Decoder
from rl_attn.encoder import ConvEncoder
from rl_attn.envs.sensors import PatchSensor
from rl_attn.errors import UserError


def test_each_cell_gets_its_own_square_in_the_encoders_order():
    """One bright square, at row 2 and column 5 of the 8x8 grid over a 64x64 image: only the
    target of the cell whose appended coordinates say (column 5, row 2) differs from the rest."""
    images = torch.zeros(1, 3, 64, 64)
    images[0, 0, 16:24, 40:48] = 1.0  # red: the lit cell's target is not one value
    target = square_pixels(images, (8, 8), side=8)
    assert target.shape == (1, 64, 192)
    spread = target[0].std(dim=1)
    (lit,) = torch.nonzero(spread > 1e-6).flatten().tolist()
    encoder = ConvEncoder(channels=[4, 4, 4], strides=[2, 2, 2], out_coords=True)
    coords = encoder(images)[0, lit, -2:]  # x, then y, in [-1, 1]
    steps = torch.linspace(-1, 1, 8)
    torch.testing.assert_close(coords, torch.stack([steps[5], steps[2]]))


def test_pooled_targets_are_the_means_of_each_part_of_the_square():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    target = square_pixels(images, (4, 4), side=2).view(2, 16, 3, 2, 2)
    centred = images - images.mean(dim=(1, 2, 3), keepdim=True)
    cell = 4 * 1 + 3  # row 1, column 3: pixels 8..15 down, 24..31 across
    part = centred[:, :, 8:12, 28:32].mean(dim=(2, 3))  # its top right quarter
    torch.testing.assert_close(target[:, cell, :, 0, 1], part)


def test_the_loss_is_zero_for_a_perfect_head_and_catches_a_cell_out_of_place():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    grid = square_pixels(images, (4, 4), side=4)  # each cell's vector: its own pixels
    loss = CellReconstruction(dim=48, side=4)
    with torch.no_grad():
        loss.head.weight.copy_(torch.eye(48))
        loss.head.bias.zero_()
    with torch.no_grad():
        assert float(loss(images, grid)) < 1e-10
        assert float(loss(images, grid.roll(1, dims=1))) > 0.5  # each holds its neighbour's
        loss.head.weight.zero_()
        torch.testing.assert_close(loss(images, grid), torch.tensor(1.0))  # the mean everywhere


def test_a_grid_that_does_not_tile_the_images_is_an_error():
    assert grid_shape_of(torch.zeros(1, 3, 64, 32), 32) == (8, 4)
    with pytest.raises(ValueError, match="a grid of 7 cells does not tile 64x64 images"):
        grid_shape_of(torch.zeros(1, 3, 64, 64), 7)


def image_agent(weight: float) -> ReinforceAgent:
    torch.manual_seed(0)
    encoder = ConvEncoder(channels=[4, 4, 4], strides=[2, 2, 2])
    decoder = Decoder(V, encoder.out_dim, embed_dim=8, hidden_dim=16, attn_dim=8, dropout=0.0)
    return ReinforceAgent(encoder, decoder, cell_reconstruction=weight)


def test_the_agents_loss_adds_the_weighted_reconstruction_and_trains_the_encoder():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tokens = torch.tensor([[1, 4, 5, 2]] * 4)
    totals, logs = [], []
    for weight in (0.0, 0.7):
        agent = image_agent(weight).train()
        torch.manual_seed(1)
        total, log = agent.loss(images, tokens)
        totals.append(total)
        logs.append(log)
    assert image_agent(0.0).reconstruction is None and logs[0]["losses/reconstruction"] == 0.0
    assert logs[1]["losses/reconstruction"] == pytest.approx(1.0)  # the head starts at zero
    torch.testing.assert_close(
        totals[1] - totals[0], torch.tensor(0.7 * logs[1]["losses/reconstruction"])
    )
    agent = image_agent(0.7).train()
    grid = agent.observe(images).grid
    agent.reconstruction(images, grid).backward()
    # a zero head sends the cells nothing; once it has learned, the encoder gets its gradient
    assert agent.encoder.net[0].weight.grad.abs().sum() == 0
    assert agent.reconstruction.head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        agent.reconstruction.head.weight.normal_()
    agent.zero_grad()
    agent.reconstruction(images, agent.observe(images).grid).backward()
    assert agent.encoder.net[0].weight.grad.abs().sum() > 0


def test_bad_weights_and_the_patch_sensor_are_refused():
    with pytest.raises(ValueError, match="cell_reconstruction must be >= 0, got -0.1"):
        image_agent(-0.1)
    with pytest.raises(UserError, match="needs sensor=grid"):
        image_agent(0.1).use_sensor(
            PatchSensor(7, cells=4, patch_size=8, gist_dim=5, gist_kernel=1)
        )


def test_the_ppo_agent_refuses_it_rather_than_ignore_it():
    encoder = ConvEncoder(channels=[4, 4, 4], strides=[2, 2, 2])
    decoder = Decoder(V, encoder.out_dim, embed_dim=8, hidden_dim=16, attn_dim=8)
    with pytest.raises(ValueError, match="cell_reconstruction must be 0"):
        PPOAgent(encoder, decoder, cell_reconstruction=0.1)
    assert PPOAgent(encoder, decoder).reconstruction is None
