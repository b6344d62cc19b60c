import itertools

import pytest
import torch
import torch.nn.functional as F

from rl_attn.agents import NoAttentionAgent, SoftAttentionAgent
from rl_attn.agents.base import CaptionAgent
from rl_attn.decoder import Decoder
from rl_attn.encoder import ConvEncoder, TorchvisionEncoder
from rl_attn.envs.glimpse import read_cells
from rl_attn.errors import UserError
from rl_attn.vocab import Vocabulary


def make_agent(cls=SoftAttentionAgent, vocab_size=12, **kwargs) -> CaptionAgent:
    torch.manual_seed(0)
    encoder = ConvEncoder(channels=(8, 16), strides=(2, 2))
    decoder = Decoder(vocab_size, encoder.out_dim, embed_dim=8, hidden_dim=16, attn_dim=8)
    return cls(encoder, decoder, **kwargs)


def test_conv_encoder_grid_shape():
    enc = ConvEncoder()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    grid = enc(images)
    assert grid.shape == (3, 64, 130)  # 128 features, then the cell's x and y
    assert enc.grid_shape(64) == (8, 8)
    # uint8 and the same image as float in [0, 1] are encoded identically
    enc.eval()
    assert torch.allclose(enc(images), enc(images.float() / 255), atol=1e-5)


def test_conv_encoder_out_coords_end_every_cell_with_its_position():
    """``out_coords``: each cell's vector ends with the x and y of its cell centre's row and
    column in [-1, 1] (left to right, top to bottom), whatever the image; the rest is the
    features without them."""
    torch.manual_seed(0)
    plain = ConvEncoder(channels=(8, 16), strides=(2, 2), out_coords=False).eval()
    torch.manual_seed(0)
    enc = ConvEncoder(channels=(8, 16), strides=(2, 2)).eval()
    assert enc.out_dim == plain.out_dim + 2 == 18
    images = torch.rand(2, 3, 32, 32)
    grid = enc(images)
    assert grid.shape == (2, 64, 18)
    torch.testing.assert_close(grid[..., :16], plain(images))
    side = torch.linspace(-1, 1, 8)
    xs, ys = side.repeat(8), side.repeat_interleave(8)  # row-major cells
    for b in range(2):
        torch.testing.assert_close(grid[b, :, 16], xs)
        torch.testing.assert_close(grid[b, :, 17], ys)


def test_conv_encoder_kernels_of_4_at_stride_2_centre_every_cell_on_its_square():
    """With every weight of a kernel equal, so that only the blocks' geometry counts, kernels
    of 4 at stride 2 (and 3 at stride 1) put each inner cell's receptive field on the cell's
    square; the default 3x3 kernels put it about 3.5 pixels up and left (a little less where
    the image's edge cuts the field). Both keep the 8x8 grid."""
    from conftest import benchmark_module

    field = benchmark_module("attention_offset").receptive_field_offset
    centred, default = ConvEncoder(kernels=(4, 4, 4, 3, 3)).eval(), ConvEncoder().eval()
    for encoder in (centred, default):
        for m in encoder.net:
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.constant_(m.weight, 0.05)
    assert [m.kernel_size[0] for m in default.net if isinstance(m, torch.nn.Conv2d)] == [3] * 5
    assert centred.grid_shape(64) == default.grid_shape(64) == (8, 8)
    images = torch.ones(2, 3, 64, 64)
    dx, dy = field(centred, images)
    assert abs(dx) < 0.01 and abs(dy) < 0.01
    dx, dy = field(default, images)
    assert -3.5 < dx < -3.0 and -3.5 < dy < -3.0


@pytest.mark.parametrize("kernels", [(4, 4), (4, 4, 4, 3, 0), (4, 4, 4, 3, True), 4])
def test_conv_encoder_kernels_need_one_positive_side_per_block(kernels):
    with pytest.raises(UserError, match=r"^encoder\.kernels needs one positive integer per block"):
        ConvEncoder(kernels=kernels)


@pytest.mark.parametrize("key", ["coords", "out_coords"])
def test_conv_encoder_coordinate_switches_must_be_booleans(key):
    with pytest.raises(UserError, match=rf"^encoder\.{key} must be true or false, got 'yes'$"):
        ConvEncoder(**{key: "yes"})


@pytest.mark.parametrize(
    "name, layer, dim", [("resnet18", "layer3", 256), ("vgg16", "layer4", 512)]
)
def test_torchvision_encoder_offline(name, layer, dim):
    enc = TorchvisionEncoder(name=name, layer=layer, weights_path=None, trainable=False)
    grid = enc(torch.rand(2, 3, 64, 64))
    assert grid.shape[0] == 2 and grid.shape[2] == dim == enc.out_dim
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize(
    "name, layer, dim",
    [("resnet18", "layer3", 256), ("resnet34", "layer3", 256), ("resnet50", "layer3", 1024),
     ("vgg16", "layer4", 512)],
)  # fmt: skip
def test_torchvision_backbones_give_14x14_grids_at_224_pixels(name, layer, dim):
    enc = TorchvisionEncoder(name=name, layer=layer, weights_path=None, trainable=True).eval()
    assert enc.grid_shape(224) == (14, 14)  # Show-Attend-Tell's 196 annotation vectors
    assert enc.out_dim == dim
    assert all(p.requires_grad for p in enc.parameters())  # fine-tuned unless frozen


def test_torchvision_encoder_from_the_hub_cache_without_network(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision

    from rl_attn.encoder import cached_weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="torchvision's cache has no resnet18 weights at"):
        TorchvisionEncoder("resnet18", weights_path="cache")
    reference = torchvision.models.resnet18(weights=None)
    path = cached_weights("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    enc = TorchvisionEncoder("resnet18", "layer4", weights_path="cache")
    assert torch.equal(enc.trunk[0].weight, reference.conv1.weight)

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="cannot download the vgg16 weights from https://"):
        TorchvisionEncoder("vgg16", weights_path="download")


def test_torchvision_encoder_local_weights_and_missing_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    enc = TorchvisionEncoder("resnet18", "layer3", weights_path=str(path))
    assert torch.equal(enc.trunk[0].weight, reference.conv1.weight)
    with pytest.raises(UserError, match="does not exist"):
        TorchvisionEncoder("resnet18", weights_path=str(tmp_path / "absent.pth"))


def test_decoder_step_shapes():
    agent = make_agent()
    grid = torch.randn(4, 16, agent.encoder.out_dim)
    state = agent.decoder.init_state(grid)
    logits = agent.decoder.attention_logits(state)
    assert logits.shape == (4, 16)
    state, word_logits = agent.decoder.step(state, torch.ones(4, dtype=torch.long), grid[:, 0])
    assert word_logits.shape == (4, 12) and state.h.shape == (4, 16)


def test_attention_scores_are_show_attend_tells_tanh_mlp():
    """The scores are computed as ``2 sigmoid(2z)`` over doubled keys; they must still be
    ``w^T tanh(W_a a_i + W_h h) + b``, with the keys from ``key_grid`` when given."""
    torch.manual_seed(0)
    dec = Decoder(12, grid_dim=6, embed_dim=4, hidden_dim=5, attn_dim=7, key_dim=3)
    grid, keys = torch.randn(2, 9, 3), torch.randn(2, 9, 3)
    state = dec.init_state(grid, key_grid=keys)
    state.h = torch.randn(2, 5) * 3  # past the linear part of tanh
    z = dec.att_grid(keys) + dec.att_hidden(state.h).unsqueeze(1)
    expected = torch.tanh(z) @ dec.att_score.weight.squeeze(0) + dec.att_score.bias
    torch.testing.assert_close(dec.attention_logits(state), expected, atol=1e-6, rtol=1e-5)


def test_soft_weights_sum_to_one_and_context_is_their_weighted_sum():
    agent = make_agent()
    grid = torch.randn(5, 16, agent.encoder.out_dim)
    logits = torch.randn(5, 16)
    loc = agent.locate(logits, agent.decoder.init_state(grid))
    assert torch.allclose(loc.weights.sum(dim=1), torch.ones(5))
    assert (loc.weights > 0).all()
    manual = (loc.weights.unsqueeze(-1) * grid).sum(dim=1)
    assert torch.allclose(read_cells(grid, loc.action), manual, atol=1e-6)


def test_no_attention_context_is_the_mean():
    agent = make_agent(NoAttentionAgent)
    grid = torch.randn(2, 16, agent.encoder.out_dim)
    loc = agent.locate(torch.randn(2, 16), agent.decoder.init_state(grid))
    assert torch.allclose(read_cells(grid, loc.action), grid.mean(dim=1), atol=1e-6)


def _batch(b=3):
    images = torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8)
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0], [1, 9, 10, 2, 0]])[:b]
    return images, tokens


def test_soft_loss_has_caption_and_doubly_stochastic_terms_and_trains_attention():
    agent = make_agent(doubly_stochastic=0.5)
    images, tokens = _batch()
    loss, logs = agent.loss(images, tokens)
    assert loss.item() == pytest.approx(
        logs["losses/caption"] + 0.5 * logs["losses/doubly_stochastic"], rel=1e-5
    )
    out = agent.rollout(images, tokens)
    coverage = (out.weights * out.mask.unsqueeze(-1)).sum(dim=1)
    assert logs["losses/doubly_stochastic"] == pytest.approx(
        ((1 - coverage) ** 2).sum(dim=1).mean().item(), rel=1e-5
    )
    loss.backward()
    # soft attention is differentiable: the attention MLP receives gradient
    assert agent.decoder.att_score.weight.grad.abs().sum() > 0


def test_caption_loss_ignores_padding():
    agent = make_agent()
    agent.eval()
    images, tokens = _batch()
    out = agent.rollout(images, tokens)
    targets = tokens[:, 1:]
    per_word = F.cross_entropy(out.word_logits.transpose(1, 2), targets, reduction="none")
    expected = per_word[targets != 0].mean()
    assert agent.caption_loss(out, tokens).item() == pytest.approx(expected.item(), rel=1e-6)


def _sequence_logprob(agent, grid, seq):
    state = agent.decoder.init_state(grid)
    word = torch.tensor([Vocabulary.start])
    total = 0.0
    for w in seq:
        loc = agent.locate(agent.decoder.attention_logits(state), state)
        state, logits = agent.decoder.step(state, word, read_cells(grid, loc.action))
        total += F.log_softmax(logits, dim=1)[0, w].item()
        word = torch.tensor([w])
        if w == Vocabulary.end:
            break
    return total


def test_beam_search_is_exact_when_the_beam_holds_every_prefix():
    # 6 words: <pad> <start> <end> <unk> and two more; max_len 3 -> every prefix fits in a beam
    agent = make_agent(vocab_size=6)
    agent.eval()
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    grid = agent.encoder(images)
    words = [w for w in range(6) if w not in (Vocabulary.pad, Vocabulary.start)]
    candidates = []
    for n in range(1, 4):
        for seq in itertools.product(words, repeat=n):
            if Vocabulary.end in seq[:-1] or (n < 3 and seq[-1] != Vocabulary.end):
                continue  # a caption ends at <end> or at max_len, never before
            candidates.append((_sequence_logprob(agent, grid, seq), seq))
    best_score, best = max(candidates)
    out = agent.caption(images, max_len=3, beam_size=36)
    found = tuple(w for w in out.tokens[0].tolist() if w != Vocabulary.pad)
    assert found == best
    assert _sequence_logprob(agent, grid, found) == pytest.approx(best_score, abs=1e-5)


def test_greedy_and_beam_return_maps_per_word():
    agent = make_agent()
    agent.eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    for beam in (1, 3):
        out = agent.caption(images, max_len=5, beam_size=beam)
        assert out.tokens.shape[0] == 2 and out.tokens.shape[1] <= 5
        assert out.weights.shape == (*out.tokens.shape, 16)
        assert torch.allclose(out.weights.sum(-1), torch.ones(out.tokens.shape))


def test_frozen_encoder_feature_cache(tmp_path, monkeypatch):
    enc = TorchvisionEncoder("resnet18", "layer3", trainable=False, cache_dir=str(tmp_path))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    first = enc(images)
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 3
    plain = TorchvisionEncoder("resnet18", "layer3", trainable=False)
    plain.load_state_dict(enc.state_dict())
    assert torch.allclose(first, plain(images), rtol=1e-2, atol=1e-2)  # float16 on disk
    calls = []
    monkeypatch.setattr(enc.trunk, "forward", lambda x: calls.append(x) or 1 / 0)
    again = enc(images[[2, 0]])  # all three from the files: the backbone is not run
    assert not calls and torch.equal(again, first[[2, 0]])
    with pytest.raises(UserError, match="encoder.cache_dir needs encoder.trainable=false"):
        TorchvisionEncoder("resnet18", trainable=True, cache_dir=str(tmp_path))
