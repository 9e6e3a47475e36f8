"""The DiT/SiT flow-map network: DiT's sizes and layout, adaLN-Zero, exact forward-mode derivatives through
attention, both time embeddings, and training with the JVP, teacher and MeanFlow methods."""

import pytest
import torch

from orch.execution.build import build_trainer, file_problems
from orch.execution.teachers import load_teacher
from orch.methods.contracts.guidance import ClassConditioning
from orch.methods.networks.dit import SIZES, DiTParams, build_dit
from orch.methods.runtime.attention import tangent_attention
from orch.trial.config import resolve_trial_config
from orch.trial.typed import TrialConfig

LATENTS = (4, 32, 32)
PUBLISHED_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}
"""DiT's parameter counts at patch 2 (its paper's table: class-conditional ImageNet-256 latents, with the
learned-variance output half)."""


def tiny(patch: int = 2, shape=(1, 8, 8), conditioning=None, **options):
    options = {"depth": 2, "hidden": 32, "heads": 2} | options
    return build_dit(DiTParams(patch=patch, **options), shape, torch.ones(1), conditioning)


def randomise_zero_layers(net) -> None:
    """Give the zero-initialised adaLN and output layers weights, so every path of the network shows."""
    for name, p in net.named_parameters():
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            torch.nn.init.normal_(p, std=0.2)


@pytest.mark.parametrize("size", list(SIZES))
def test_each_size_has_dits_parameter_count_and_token_grid(size):
    with torch.device("meta"):  # the shapes without the memory: XL has 675M parameters
        net = build_dit(DiTParams(size=size), LATENTS, torch.ones(1), ClassConditioning(1000))
    depth, hidden, heads = SIZES[size]
    count = sum(p.numel() for p in net.parameters())
    # paper B's end-time embedder is the flow map's addition; DiT also outputs a variance half per pixel
    second_time = sum(p.numel() for p in net.s_embedder.parameters())
    variance_half = 2 * 2 * LATENTS[0] * (hidden + 1)
    assert round((count - second_time + variance_half) / 1e6) == PUBLISHED_MILLIONS[size]
    assert len(net.blocks) == depth and net.blocks[0].attn.heads == heads
    assert net.pos_embed.shape == (1, 256, hidden)  # 32 × 32 latents in 2 × 2 patches


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_each_patch_maps_images_to_images_and_adaln_zero_starts_at_zero(patch):
    torch.manual_seed(0)
    net = tiny(patch, shape=(3, 16, 16))
    x, a, b = torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2)
    assert net.pos_embed.shape == (1, (16 // patch) ** 2, 32)
    assert torch.equal(net(x, a, b), torch.zeros_like(x))  # adaLN-Zero: every block the identity, output 0
    randomise_zero_layers(net)
    v = net(x, a, b)
    assert v.shape == x.shape and v.abs().mean() > 0.01


def test_a_pixel_lands_where_its_patch_token_put_it():
    net = tiny(4, shape=(2, 8, 8))
    tokens = torch.arange(4 * 16 * 2, dtype=torch.float32).reshape(1, 4, 32)  # (n, L, p²·C), C last
    image = net.unpatchify(tokens)
    # token 1 is the top row's second patch: its first value is channel 0 of pixel (0, 4)
    assert image.shape == (1, 2, 8, 8) and image[0, 0, 0, 4] == tokens[0, 1, 0] and image[0, 1, 0, 4] == 33


@pytest.mark.parametrize("time_embedding", ["secant", "meanflow"])
def test_forward_mode_derivatives_through_attention_equal_finite_differences(time_embedding):
    torch.manual_seed(0)
    net = tiny(2, time_embedding=time_embedding, conditioning=ClassConditioning(3)).double()
    randomise_zero_layers(net)
    x, a, b = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2).double(), torch.rand(2).double()
    labels = torch.tensor([0, 3])  # a class and the null class
    dx, da, db = torch.randn_like(x), torch.ones(2).double(), torch.ones(2).double()

    def v(x, a, b):
        return net(x, a, b, labels)

    with tangent_attention():  # what CountingNet.jvp does for the JVP methods
        _, tangent = torch.func.jvp(v, (x, a, b), (dx, da, db))
    eps = 1e-6
    fd = (v(x + eps * dx, a + eps * da, b + eps * db) - v(x - eps * dx, a - eps * da, b - eps * db)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    assert tangent.abs().max() > 1e-3
    with tangent_attention():
        exact = v(x, a, b)
    torch.testing.assert_close(v(x, a, b), exact)  # the fused kernel and the explicit path agree


def test_the_two_time_embeddings_condition_on_what_their_papers_embed():
    torch.manual_seed(0)
    secant, meanflow = tiny(time_embedding="secant"), tiny(time_embedding="meanflow")
    a, b = torch.tensor([0.2, 0.5]), torch.tensor([0.7, 0.5])
    t_e, s_e = secant.t_embedder, secant.s_embedder
    torch.testing.assert_close(secant.condition(a, b)[0], (t_e(a) + s_e(b)) / 2)
    # MeanFlow's time runs the other way (1 = noise): t = 1 − a, and h = t − r = b − a
    t_m, h_m = meanflow.t_embedder, meanflow.h_embedder
    torch.testing.assert_close(meanflow.condition(a, b)[0], t_m(1 - a) + h_m(b - a))
    s_e.load_state_dict(t_e.state_dict())  # paper B's transfer: the end-time embedder a copy of the start's
    torch.testing.assert_close(secant.condition(a, a)[0], t_e(a))


def test_decoupled_time_is_the_flow_model_on_the_diagonal_and_splits_the_blocks_by_time():
    """DMF's conversion: at a = b a decoupled DiT is exactly the flow model with the same weights (here a secant
    DiT whose end-time embedder is a copy of the start's); the start blocks see a only, the rest and the output b."""
    torch.manual_seed(0)
    decoupled = tiny(time_embedding="decoupled", depth=3, decoupled_blocks=2).double()
    randomise_zero_layers(decoupled)
    flow = tiny(time_embedding="secant", depth=3).double()
    state = decoupled.state_dict()
    flow.load_state_dict(state | {"s" + k[1:]: v for k, v in state.items() if k.startswith("t_embedder.")})
    x, tau = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    assert torch.equal(decoupled(x, tau, tau), flow(x, tau, tau))
    seen = []
    decoupled.blocks[2].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    later, other_start = torch.clamp(tau + 0.3, max=1.0), tau * 0.5
    outputs = [decoupled(x, a, b) for a, b in ((tau, tau), (tau, later), (other_start, tau))]
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])  # block 2's input: a only
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # b reaches the output
    assert tiny(time_embedding="decoupled", depth=7).start_blocks == 5  # ⌊5/7⌋ of the depth, DMF's 20 of 28
    with pytest.raises(ValueError, match="more than the depth"):
        DiTParams(depth=2, time_embedding="decoupled", decoupled_blocks=3)


def test_bad_shapes_and_widths_are_refused_naming_the_problem():
    with pytest.raises(ValueError, match="sides divisible by patch 4"):
        tiny(4, shape=(1, 10, 10))
    with pytest.raises(ValueError, match="multiple of 4 and of the 3 heads"):
        DiTParams(hidden=32, heads=3)
    _, problems = resolve_trial_config({"model": {"name": "dit", "patch": 3}})
    assert problems and problems[0].path == "model.patch"


@pytest.mark.parametrize("method", ["lsd", "meanflow", "sdei"])
def test_a_tiny_conditional_dit_trains_on_mnist(method):
    config, problems = resolve_trial_config(
        {
            "dataset": {"name": "mnist", "limit": 64, "conditional": True},
            "model": {"name": "dit", "patch": 4, "depth": 2, "hidden": 32, "heads": 2},
            "method": {"name": method},
            "train": {"batch_size": 8, "device": "cpu", "ema": [0.9], "lr": 1e-3},
            "eval": {"metrics": ["fid"]},
        }
    )
    assert not problems, problems
    teacher = build_dit(DiTParams(patch=4, depth=2, hidden=32, heads=2), (1, 28, 28), torch.ones(1),
                        ClassConditioning(10)) if method == "sdei" else None  # fmt: skip
    if teacher is not None:
        randomise_zero_layers(teacher)  # a teacher whose velocity is not 0
    trainer = build_trainer(TrialConfig.parse(config), torch.device("cpu"), teacher)
    before = [p.detach().clone() for p in trainer.net.parameters()]
    losses = [trainer.train_step(with_stats=True)["train/loss"] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.net.parameters()))


def official_layout(depth, hidden, patch, channels, side, classes, learn_sigma=True, seed=0) -> dict:
    """Random tensors under the DiT/SiT repositories' parameter names and shapes (their models.py: timm's
    patch embedding and MLP, a fixed position embedding saved with the weights, adaLN as SiLU → Linear, a
    learned-variance output half)."""
    d, tokens, out = hidden, (side // patch) ** 2, patch * patch * channels * (2 if learn_sigma else 1)
    shapes = {
        "x_embedder.proj.weight": (d, channels, patch, patch), "x_embedder.proj.bias": (d,),
        "pos_embed": (1, tokens, d),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (out, d), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }  # fmt: skip
    for i in range(depth):
        shapes |= {
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d), f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        }  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    return {name: 0.1 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}


TINY_MNIST = {"name": "dit", "patch": 4, "depth": 2, "hidden": 32, "heads": 2}


def distillation_config(model: dict, method: dict) -> dict:
    config, problems = resolve_trial_config(
        {
            "dataset": {"name": "mnist", "limit": 64, "conditional": True},
            "model": model,
            "method": method,
            "train": {"batch_size": 8, "device": "cpu", "ema": [0.9]},
            "eval": {"metrics": ["fid"]},
        }
    )
    assert not problems, problems
    return config


@pytest.mark.parametrize("container", [None, "ema"], ids=["released-file", "training-checkpoint"])
@pytest.mark.parametrize("online_cfg", [None, [1.0, 2.5]], ids=["plain", "online-cfg"])
def test_official_checkpoints_load_as_teacher_and_init_and_the_diagonal_starts_as_the_teacher(
    tmp_path, container, online_cfg
):
    official = official_layout(depth=2, hidden=32, patch=4, channels=1, side=28, classes=10)
    path = tmp_path / "SiT-tiny.pt"
    torch.save(official if container is None else {container: official, "args": {"model": "SiT-tiny"}}, path)
    method = {"name": "sdei", "teacher": {"path": str(path)}, "online_cfg": online_cfg}
    config = distillation_config(TINY_MNIST | {"init_from": str(path)}, method)
    teacher, _ = load_teacher(path, config)
    assert torch.equal(teacher.x_embedder.proj.weight, official["x_embedder.proj.weight"])
    assert torch.equal(teacher.s_embedder.mlp[2].weight, official["t_embedder.mlp.2.weight"])  # paper B's transfer
    student = build_trainer(TrialConfig.parse(config), torch.device("cpu"), teacher).net.net  # inside its counter
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    labels, omega = torch.tensor([0, 3, 9, 10]), None if online_cfg is None else torch.zeros(4)
    with torch.no_grad():
        # f(x; t, t) of the student at step 0 is exactly the teacher's velocity (for ω's embedder: see below)
        diagonal, velocity = student(x, t, t, labels, omega), teacher(x, t, t, labels)
    if online_cfg is None:
        assert torch.equal(diagonal, velocity) and velocity.abs().max() > 0.01
    else:  # the student's own guidance embedder is new: only it differs from the teacher
        assert student.cfg_embedder is not None and teacher.cfg_embedder is None
        shared = {k: v for k, v in student.state_dict().items() if not k.startswith("cfg_embedder.")}
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in shared.items())


def test_an_official_checkpoint_converted_to_decoupled_time_is_the_flow_model_at_step_0():
    """DMF's conversion of a SiT checkpoint: the decoupled network loads it as it is (one time embedder) and at
    a = b gives exactly what the checkpoint's flow model gives (here loaded as a secant network)."""
    official = official_layout(depth=2, hidden=32, patch=4, channels=1, side=28, classes=10)
    shape, conditioning = (1, 28, 28), ClassConditioning(10)
    decoupled = tiny(4, shape, conditioning, time_embedding="decoupled", decoupled_blocks=1)
    flow = tiny(4, shape, conditioning)
    decoupled.load_pretrained(official, "SiT-tiny.pt")
    flow.load_pretrained(official, "SiT-tiny.pt")
    x, t, labels = torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        assert torch.equal(decoupled(x, t, t, labels), flow(x, t, t, labels))
        assert not torch.equal(decoupled(x, t, t.clamp(min=0.5) + 0.1, labels), flow(x, t, t, labels))


def test_a_learned_variance_half_is_dropped_and_the_mean_lands_on_its_pixels(tmp_path):
    official = official_layout(depth=1, hidden=32, patch=4, channels=2, side=8, classes=3)
    official["final_layer.linear.weight"].zero_()  # the output is then the bias, arranged per patch pixel
    official["final_layer.adaLN_modulation.1.weight"].zero_()
    official["final_layer.adaLN_modulation.1.bias"].zero_()
    net = tiny(4, shape=(2, 8, 8), conditioning=ClassConditioning(3), depth=1)
    net.load_pretrained(official, "official.pt")
    out = net(torch.randn(1, 2, 8, 8), torch.rand(1), torch.rand(1), torch.tensor([1]))
    bias = official["final_layer.linear.bias"].reshape(4, 4, 4)  # (patch row, patch column, 2C), C = 2 means
    for c in range(2):
        for row in range(8):
            for col in range(8):
                assert out[0, c, row, col] == bias[row % 4, col % 4, c], (c, row, col)


def test_a_checkpoint_of_another_network_names_what_does_not_match(tmp_path):
    net = tiny(4, shape=(1, 28, 28), conditioning=ClassConditioning(10))
    deeper = official_layout(depth=3, hidden=32, patch=4, channels=1, side=28, classes=10)
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.2\.attn\.qkv\.weight'"):
        net.load_pretrained(deeper, "deeper.pt")
    wider = official_layout(depth=2, hidden=64, patch=4, channels=1, side=28, classes=10)
    with pytest.raises(ValueError, match=r"other shapes \['x_embedder\.proj\.weight \(64, 1, 4, 4\) \(this network"):
        net.load_pretrained(wider, "wider.pt")
    meanflow = tiny(4, shape=(1, 28, 28), conditioning=ClassConditioning(10), time_embedding="meanflow")
    sit = official_layout(depth=2, hidden=32, patch=4, channels=1, side=28, classes=10)
    with pytest.raises(ValueError, match=r"sit\.pt is not a checkpoint of this DiT: missing \['h_embedder"):
        meanflow.load_pretrained(sit, "sit.pt")  # SiT has no jump-length embedder to start MeanFlow's from
    config, problems = resolve_trial_config({"model": {"name": "dit", "init_from": str(tmp_path / "absent.pt")}})
    assert not problems  # a study for a cluster validates anywhere; the machine that submits checks the file
    (missing,) = file_problems(config)
    assert missing.path == "model.init_from" and "no such file" in missing.message
