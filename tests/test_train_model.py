"""The Florence-VL model: tower features, DBFusion, projectors, stages, loss, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.train.config import (
    IMAGE_TOKEN,
    FusionConfig,
    LanguageModelConfig,
    TinyModelConfig,
    TrainConfig,
    VisionTowerConfig,
)
from engine.train.model import (
    DBFusionProjector,
    FlorenceVisionTower,
    build_florence_vl,
)
from engine.train.tiny import build_tiny_florence2, build_tiny_language_model

TINY = TinyModelConfig(hidden_size=32, layers=1, heads=2, image_size=64)
TASKS = ("<MORE_DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>")
N = 5  # Florence-2's tokens for a 64-pixel image: a 2x2 grid plus the pooled token


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_config(**fusion) -> TrainConfig:
    return TrainConfig(
        vision=VisionTowerConfig(checkpoint=None, tiny=TINY, breadth_tasks=TASKS),
        language_model=LanguageModelConfig(checkpoint=None, tiny=TINY),
        fusion=FusionConfig(**fusion),
    )


def images(count: int) -> list[Image.Image]:
    """Different images, so that features of one cannot stand in for another's."""
    return [Image.new("RGB", (80, 60), (40 * k, 200 - 30 * k, 90)) for k in range(count)]


def batch(processor, count: int = 2, question: str = "What is in the image?"):
    """Prompts with the image placeholder, left-padded; answers labelled, the rest -100."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    placeholder = IMAGE_TOKEN * processor.num_visual_tokens
    answers = ["A red ball.", "Two cars wait on a street."][:count]
    texts = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": f"{placeholder}\n{question}"},
                {"role": "assistant", "content": answer},
            ],
            tokenize=False,
        )
        for answer in answers
    ]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    # Only what follows "<|assistant|>\n" counts, as the data layer's masking does.
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for row, ids in enumerate(enc["input_ids"]):
        answer_start = int((ids == assistant).nonzero()[0, 0]) + 2
        labels[row, :answer_start] = -100
    return processor.pixel_values(images(count)), enc["input_ids"], enc["attention_mask"], labels


@pytest.fixture(scope="module")
def built():
    return build_florence_vl(train_config())


@pytest.mark.parametrize(
    ("concat", "projector", "boundary", "tokens", "width"),
    [
        ("channel", "mlp", False, N, 4 * 32),
        ("token", "mlp", False, 4 * N, 32),
        ("channel", "omnifusion", True, N + 2, 4 * 32),
        ("token", "omnifusion", False, 4 * N, 32),
    ],
)
def test_dbfusion_shapes(concat, projector, boundary, tokens, width):
    fusion = FusionConfig(concat=concat, projector=projector, image_boundary_tokens=boundary)
    module = DBFusionProjector(fusion, num_features=4, vision_dim=32, llm_dim=48)
    assert module.num_tokens(N) == tokens
    first = module.net[0]
    in_features = first.linear1.in_features if projector == "omnifusion" else first.in_features
    assert in_features == width
    out = module(torch.randn(3, 4, N, 32))
    assert out.shape == (3, tokens, 48)

    model, processor = build_florence_vl(train_config(**fusion.model_dump()))
    assert model.num_visual_tokens == processor.num_visual_tokens == tokens
    pixel_values, input_ids, attention_mask, labels = batch(processor)
    assert torch.isfinite(model(pixel_values, input_ids, attention_mask, labels).loss)


def test_channel_concat_keeps_each_tokens_views_together():
    """Visual token j is built from the depth and breadth features of image token j only."""
    module = DBFusionProjector(FusionConfig(), num_features=4, vision_dim=8, llm_dim=16)
    features = torch.randn(1, 4, N, 8)
    changed = features.clone()
    changed[0, 2, 3] += 1.0  # one breadth view of token 3
    delta = (module(changed) - module(features)).abs().sum(-1)[0]
    assert delta[3] > 0
    assert torch.all(delta[[0, 1, 2, 4]] == 0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_depth_counts_linears(depth):
    module = DBFusionProjector(FusionConfig(mlp_depth=depth), 4, vision_dim=32, llm_dim=48)
    kinds = [type(m) for m in module.net]
    assert kinds == [nn.Linear] + [nn.GELU, nn.Linear] * (depth - 1)
    assert module.net[0].in_features == 4 * 32


def test_omnifusion_adapter_mixes_tokens_and_mlp_does_not():
    """OmniFusion's transformer layer lets every visual token see the others."""
    features = torch.randn(1, 4, N, 32)
    changed = features.clone()
    changed[0, :, 0] += 1.0
    for projector, mixes in (("omnifusion", True), ("mlp", False)):
        module = DBFusionProjector(FusionConfig(projector=projector), 4, 32, 48)
        delta = (module(changed) - module(features)).abs().sum(-1)[0, 1:]
        assert bool(torch.all(delta > 0)) is mixes


def test_breadth_features_match_florence2_per_prompt():
    florence2, processor = build_tiny_florence2(TINY)
    tower = FlorenceVisionTower(florence2, processor, TASKS).eval()
    pictures = images(2)
    pixel_values = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = tower(pixel_values)
        assert features.shape == (2, 1 + len(TASKS), N, 32)
        depth = florence2.get_image_features(pixel_values).pooler_output
        assert torch.allclose(features[:, 0], depth, atol=1e-5)
        for i, task in enumerate(TASKS):
            # Florence-2's own forward, one prompt at a time, unpadded.
            inputs = processor(text=[task] * 2, images=pictures, return_tensors="pt")
            encoded = florence2.model(**inputs).encoder_last_hidden_state[:, :N]
            assert torch.allclose(features[:, 1 + i], encoded, atol=1e-5), task
    for i in range(1, 1 + len(TASKS)):
        for j in range(i + 1, 1 + len(TASKS)):
            assert not torch.allclose(features[:, i], features[:, j], atol=1e-3)


def test_boundary_tokens_sit_around_the_visual_tokens():
    model, processor = build_florence_vl(train_config(image_boundary_tokens=True))
    pixel_values, input_ids, _, _ = batch(processor)
    with torch.no_grad():
        embeds = model.embed(pixel_values, input_ids)
    start, end = model.projector.boundary
    for row in range(input_ids.shape[0]):
        positions = (input_ids[row] == processor.image_token_id).nonzero().flatten()
        assert len(positions) == model.num_visual_tokens == N + 2
        assert torch.equal(embeds[row, positions[0]], start)
        assert torch.equal(embeds[row, positions[-1]], end)
        inner = embeds[row, positions[1:-1]]
        assert not torch.any(torch.all(inner == start, dim=-1) | torch.all(inner == end, dim=-1))


def test_set_stage_freezes_exactly_the_vision_tower(built):
    model, _ = built
    tower = {id(p) for p in model.vision_tower.parameters()}
    model.set_stage(train_vision_tower=False)
    model.train()
    for parameter in model.parameters():
        assert parameter.requires_grad is (id(parameter) not in tower)
    assert not model.vision_tower.training
    assert model.projector.training and model.language_model.training
    model.set_stage(train_vision_tower=True)
    assert all(p.requires_grad for p in model.parameters())
    assert model.vision_tower.training


@pytest.mark.parametrize("train_vision_tower", [True, False])
def test_backward_reaches_what_the_stage_trains(train_vision_tower):
    model, processor = build_florence_vl(train_config(image_boundary_tokens=True))
    model.set_stage(train_vision_tower)
    model.train()
    model(*batch(processor)).loss.backward()
    for name, parameter in model.named_parameters():
        in_tower = name.startswith("vision_tower.")
        if in_tower and not train_vision_tower:
            assert parameter.grad is None, name
        else:
            # Every trained parameter takes part in the loss (data-parallel needs that).
            assert parameter.grad is not None, name
    projector_grads = [p.grad.abs().sum() for p in model.projector.parameters()]
    assert all(g > 0 for g in projector_grads)


def test_loss_is_the_mean_over_labelled_tokens(built):
    model, processor = built
    model.eval()
    pixel_values, input_ids, attention_mask, labels = batch(processor)
    assert (labels == -100).any() and (labels != -100).any()
    with torch.no_grad():
        out = model(pixel_values, input_ids, attention_mask, labels)
        every = model(pixel_values, input_ids, attention_mask, input_ids).loss
    manual = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert not torch.allclose(out.loss, every, atol=1e-3)


def test_generate_returns_the_greedy_continuation(built):
    model, processor = built
    model.eval()
    pixel_values = processor.pixel_values(images(2))
    prompt_ids = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": IMAGE_TOKEN * model.num_visual_tokens + "\nDescribe."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    prompt = prompt_ids["input_ids"].expand(2, -1)
    mask = prompt_ids["attention_mask"].expand(2, -1)
    new = model.generate(pixel_values, prompt, mask, max_new_tokens=4, do_sample=False)
    assert new.dtype == torch.long and new.shape[0] == 2 and 1 <= new.shape[1] <= 4
    with torch.no_grad():
        logits = model(pixel_values, prompt, mask).logits
    assert torch.equal(new[:, 0], logits[:, -1].argmax(-1))


def test_wrong_count_of_image_tokens_is_a_clear_error(built):
    model, processor = built
    pixel_values, input_ids, attention_mask, _ = batch(processor)
    first = (input_ids[0] == processor.image_token_id).nonzero()[0, 0]
    input_ids = input_ids.clone()
    input_ids[0, first] = processor.tokenizer.pad_token_id
    with pytest.raises(
        ValueError, match=r"exactly 5 '<image>' tokens.*sample\(s\) \[0\] hold \[4\]"
    ):
        model(pixel_values, input_ids, attention_mask)
    with pytest.raises(ValueError, match="each sample has exactly one image"):
        model(pixel_values[:1], input_ids, attention_mask)


def test_tiny_builders_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    (model_a, tokenizer_a), (model_b, tokenizer_b) = (build_tiny_language_model(TINY) for _ in "ab")
    (vl_a, _), (vl_b, _) = (build_florence_vl(train_config()) for _ in "ab")
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in ((model_a, model_b), (vl_a, vl_b)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    assert tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
    other, _ = build_tiny_language_model(TINY.model_copy(update={"seed": 1}))
    assert not torch.equal(other.lm_head.weight, model_a.lm_head.weight)


def test_tiny_tokenizer_chat_template_uses_single_role_tokens():
    _, tokenizer = build_tiny_language_model(TINY)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How many cars?"}, {"role": "assistant", "content": "3"}],
    )["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<s>", "<|user|>"]
    assert "<|assistant|>" in tokens
    assert tokens.count("<|end|>") == 2 and tokenizer.eos_token == "<|end|>"
    assert tokenizer.decode(tokenizer("héllo, wörld 42")["input_ids"]) == "héllo, wörld 42"


@pytest.mark.parametrize(
    ("size", "stride", "grid"), [(64, 32, 2), (64, 16, 4), (64, 8, 8), (448, 8, 56)]
)
def test_a_finer_vision_stride_gives_a_finer_grid_of_visual_tokens(size, stride, grid):
    config = TinyModelConfig(
        hidden_size=32, layers=1, heads=2, image_size=size, vision_stride=stride
    )
    model, processor = build_tiny_florence2(config)
    inputs = processor(text=["<OD>"], images=[Image.new("RGB", (size, size))], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == grid * grid + 1  # the grid and Florence-2's pooled token
    with torch.no_grad():
        loss = model(**inputs, labels=torch.tensor([[5, 6, 7]])).loss
    assert torch.isfinite(loss)
