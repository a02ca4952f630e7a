"""Exactness tests of the visual-expert model on tiny random checkpoints saved to and loaded from disk.

Tolerances: float32 throughout; logits compared with ``atol=1e-5, rtol=1e-5`` (logits are O(1)).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

from grounding.boxes import format_answer, format_question, prompt_and_target
from grounding.world import make_world
from model.cogvlm import VisualExpertConfig, VisualExpertForCausalLM
from model.testing import write_debug_model

TOL = dict(atol=1e-5, rtol=1e-5)
BOS = 1


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run fastest on one thread, and a shared CI box then suffers no thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(lm, vision, **kw) -> VisualExpertForCausalLM:
    return VisualExpertForCausalLM.from_config(VisualExpertConfig(lm=lm, vision=vision, **kw)).eval()


@pytest.fixture(scope="module")
def model(llama_dir, clip_dir):
    return build(llama_dir, clip_dir)


@pytest.fixture(scope="module")
def images():
    return [w.render() for w in make_world(3, seed=3)]


def random_ids(B, T, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    ids[:, 0] = BOS
    return ids


def image_embeds(model, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, model.num_image_tokens, model.lm_config.hidden_size, generator=g)


def reference_logits(model, input_ids, embeds):
    """CogVLM the obvious slow way (unpadded rows): both experts on every token, picked by a mask;
    explicit positions [0, 1 x N, 2, 3, ...]; eager attention with an explicit causal mask."""
    m, shallow = model.model, model.config.shallow
    B, T = input_ids.shape
    N = embeds.shape[1]
    L = T + N
    tok = m.embed_tokens(input_ids)
    x = torch.cat([tok[:, :1], embeds, tok[:, 1:]], 1)  # (B, L, D)
    vis = torch.zeros(L, dtype=torch.bool)
    vis[1:N + 1] = True
    pos = torch.cat([torch.tensor([0]), torch.ones(N, dtype=torch.long), torch.arange(2, T + 1)])
    cos, sin = m.rotary_emb(pos[None].expand(B, L), x.dtype)

    def route(lang, vision, h):
        return lang(h) if shallow else torch.where(vis[None, :, None], vision(h), lang(h))

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for layer in m.layers:
        a = layer.self_attn
        H, Hkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        qkv = route(a.language_expert_query_key_value, getattr(a, "vision_expert_query_key_value", None),
                    layer.input_layernorm(x))
        q, k, v = qkv.view(B, L, H + 2 * Hkv, hd).transpose(1, 2).split([H, Hkv, Hkv], 1)
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        w = (q @ k.transpose(2, 3) * hd ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        o = (w @ v).transpose(1, 2).reshape(B, L, H * hd)
        x = x + route(a.language_expert_dense, getattr(a, "vision_expert_dense", None), o)
        x = x + route(layer.mlp.language_mlp, getattr(layer.mlp, "vision_mlp", None), layer.post_attention_layernorm(x))
    return model.lm_head(m.norm(x))


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(attn_implementation="flash"), dict(lm_lr_mult=-1.0), dict(image_size=0),
                                 dict(dtype="int8"), dict(lm="")])
def test_config_rejects_bad_values(bad):
    kw = dict(lm="some/lm", vision="some/vit") | bad
    with pytest.raises(ValueError):
        VisualExpertConfig(**kw)


def test_write_debug_model_writes_loadable_checkpoints(tmp_path, images):
    cfg = write_debug_model(tmp_path)
    m = VisualExpertForCausalLM.from_config(cfg)
    assert (m.num_image_tokens, m.lm_config.model_type, m.vision.kind) == (16, "llama", "clip")
    assert write_debug_model(tmp_path) == cfg  # second call reuses what is there
    ids, mask = m.tokenize_prompts(["Question: Where is the red ball? Answer:", "Hi"])
    n_hi = len(m.tokenizer("Hi", add_special_tokens=False)["input_ids"])
    assert ids[0, 0] == BOS and mask[0].all() and mask[1].sum() == n_hi + 1  # left-padded, BOS first
    assert ids[1, -n_hi - 1] == BOS and (ids[1, :-n_hi - 1] == m.pad_token_id).all()


# --- text-only: exactly the LM -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "llama-linear-rope", "llama3-rope-tied", "llama-yarn-rope", "qwen2",
                                    "mistral"])
def test_text_only_logits_equal_hf(family, lm_dirs, clip_dir):
    ours = build(lm_dirs[family], clip_dir)
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs[family]).eval()
    ids = random_ids(3, 40, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0           # right padding
    mask[2, :9] = 0            # left padding: BOS at column 9
    ids[2, 9] = BOS
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, mask).logits
        b = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert b[real].abs().max() > 0.5  # the comparison is not between near-zero numbers
    torch.testing.assert_close(a[real], b[real], **TOL)


def test_vision_experts_do_not_touch_text_only_inputs(llama_dir, clip_dir):
    m = build(llama_dir, clip_dir)
    ids = random_ids(2, 12)
    with torch.no_grad():
        before = m(ids).logits
        for name, p in m.named_parameters():
            if ".vision_" in name:
                p.add_(torch.randn_like(p))
        after = m(ids).logits
    assert torch.equal(before, after)


def test_experts_start_as_copies_of_the_lm(model):
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        assert torch.equal(a.vision_expert_query_key_value.weight, a.language_expert_query_key_value.weight)
        assert torch.equal(a.vision_expert_dense.weight, a.language_expert_dense.weight)
        assert torch.equal(mlp.vision_mlp.gate_up_proj.weight, mlp.language_mlp.gate_up_proj.weight)
        assert a.vision_expert_dense.weight.data_ptr() != a.language_expert_dense.weight.data_ptr()


# --- with images: routing, positions, mask -----------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("shallow", [False, True])
def test_image_forward_equals_slow_reference(family, shallow, lm_dirs, clip_dir):
    m = build(lm_dirs[family], clip_dir, shallow=shallow)
    if not shallow:  # make the experts differ from the LM so a routing mistake shows
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".vision_" in name:
                    p.add_(0.05 * torch.randn_like(p))
    ids, emb = random_ids(2, 12, seed=2), image_embeds(m, 2)
    with torch.no_grad():
        ours = m(ids, image_embeds=emb).logits
        ref = reference_logits(m, ids, emb)
    assert ours.shape == (2, 12 + m.num_image_tokens, m.lm_config.vocab_size)
    torch.testing.assert_close(ours, ref, **TOL)


def _perturb_and_diff(m, ids, emb, params):
    with torch.no_grad():
        before = m(ids, image_embeds=emb).logits
        saved = [p.clone() for p in params]
        for p in params:
            p.add_(torch.randn_like(p))
        after = m(ids, image_embeds=emb).logits
        for p, s in zip(params, saved):
            p.copy_(s)
    return (after - before).abs().amax(-1)  # (B, L)


@pytest.mark.parametrize("which", ["query", "dense", "mlp"])
def test_image_tokens_see_only_expert_weights(llama_dir, clip_dir, which):
    """Perturb one projection of the last layer (per-token there: nothing downstream mixes tokens):
    the vision expert's change only image positions, the LM's change only text positions."""
    m = build(llama_dir, clip_dir)
    ids, emb = random_ids(2, 10, seed=3), image_embeds(m, 2, seed=3)
    N, L = m.num_image_tokens, 10 + m.num_image_tokens
    is_image = torch.zeros(L, dtype=torch.bool)
    is_image[1:N + 1] = True
    a, mlp = m.model.layers[-1].self_attn, m.model.layers[-1].mlp
    q_rows = a.num_heads * a.head_dim

    def params(prefix):
        if which == "query":  # only the query rows: keys/values would reach later tokens
            lin = getattr(a, f"{prefix}_expert_query_key_value")
            return [lin.weight[:q_rows]]
        if which == "dense":
            return [getattr(a, f"{prefix}_expert_dense").weight]
        return list(getattr(mlp, f"{prefix}_mlp").parameters())

    vision_diff = _perturb_and_diff(m, ids, emb, params("vision"))
    text_diff = _perturb_and_diff(m, ids, emb, params("language"))
    assert (vision_diff[:, is_image] > 1e-3).all() and (vision_diff[:, ~is_image] == 0).all()
    text = ~is_image
    if which == "query":
        text[0] = False  # BOS attends to itself only: softmax over one key ignores the query
    assert (text_diff[:, text] > 1e-3).all() and (text_diff[:, is_image] == 0).all()


def test_position_ids_bos_zero_images_one_text_continues(model):
    N = model.num_image_tokens
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0                       # right-padded row: BOS + 3 tokens
    mask[1, :2] = 0                       # left-padded row: BOS at column 2
    ids[1, 2] = BOS
    batch = model._prepare(ids, mask, image_embeds(model, 2), None)[2]
    pos = batch.positions
    assert batch.vision_token_mask.sum(1).tolist() == [N, N] and batch.vision_token_mask[1, 3:3 + N].all()
    assert pos[0, :N + 4].tolist() == [0] + [1] * N + [2, 3, 4]
    assert pos[1, 2:].tolist() == [0] + [1] * N + [2, 3, 4]
    text_only = model._prepare(ids, mask, None, None)[2].positions
    assert text_only[0, :4].tolist() == [0, 1, 2, 3] and text_only[1, 2:].tolist() == [0, 1, 2, 3]


def test_causal_mask_also_between_image_tokens(model):
    ids, emb = random_ids(1, 8, seed=4), image_embeds(model, 1, seed=4)
    n = 5  # change image token n: slots 0..n (BOS, images 0..n-1) must not move, slot n+1 must
    emb2 = emb.clone()
    emb2[0, n] += 1.0
    ids2 = ids.clone()
    ids2[0, -1] = ids[0, -1] % 200 + 5  # change the last text token: nothing before it moves
    with torch.no_grad():
        a, b, c = (model(i, image_embeds=e).logits for i, e in ((ids, emb), (ids, emb2), (ids2, emb)))
    assert torch.equal(a[0, :n + 1], b[0, :n + 1]) and not torch.allclose(a[0, n + 1], b[0, n + 1])
    assert torch.equal(a[0, :-1], c[0, :-1]) and not torch.allclose(a[0, -1], c[0, -1])


def test_left_and_right_padding_give_the_same_logits(model):
    N = model.num_image_tokens
    rows = [random_ids(1, 5, seed=5)[0], random_ids(1, 9, seed=6)[0]]
    emb = image_embeds(model, 2, seed=5)
    T = 9
    right = torch.zeros(2, T, dtype=torch.long)
    left = torch.zeros(2, T, dtype=torch.long)
    rmask, lmask = torch.zeros_like(right), torch.zeros_like(left)
    for i, r in enumerate(rows):
        right[i, :len(r)], rmask[i, :len(r)] = r, 1
        left[i, T - len(r):], lmask[i, T - len(r):] = r, 1
    with torch.no_grad():
        lr = model(right, rmask, image_embeds=emb).logits
        ll = model(left, lmask, image_embeds=emb).logits
        alone = model(rows[0][None], image_embeds=emb[:1]).logits
    n0 = len(rows[0]) + N
    torch.testing.assert_close(lr[0, :n0], alone[0], **TOL)
    torch.testing.assert_close(ll[0, -n0:], alone[0], **TOL)
    torch.testing.assert_close(lr[1], ll[1], **TOL)


def test_loss_is_next_token_loss_with_images_ignored(model, images):
    ids = random_ids(2, 7, seed=7)
    labels = ids.clone()
    labels[:, :3] = -100
    pv = model.preprocess(images[:2])
    out = model(ids, pixel_values=pv, labels=labels)
    N = model.num_image_tokens
    full = torch.cat([labels[:, :1], torch.full((2, N), -100), labels[:, 1:]], 1)
    expect = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                               full[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expect)
    assert 0 < out.loss.item() < 20


def test_loss_from_labelled_logits_only_equals_the_full_loss(llama_dir, clip_dir):
    m = build(llama_dir, clip_dir, freeze_lm=False)
    ids, pv = random_ids(2, 9, seed=12), torch.randn(2, 3, 32, 32)
    labels = ids.clone()
    labels[:, :5] = -100
    losses, grads = [], []
    for keep in ("all", "labels"):
        m.zero_grad(set_to_none=True)
        out = m(ids, pixel_values=pv, labels=labels, logits_to_keep=keep)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(m.lm_head.weight.grad.clone())
        if keep == "labels":
            assert out.logits.shape == (2 * 4, m.lm_config.vocab_size)  # 4 labelled next tokens per row
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    torch.testing.assert_close(grads[0], grads[1], **TOL)
    with pytest.raises(ValueError):
        m(ids, logits_to_keep="labels")


def test_kv_cache_chunks_equal_one_forward(model):
    ids, emb = random_ids(2, 10, seed=8), image_embeds(model, 2, seed=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, 3] = BOS
    with torch.no_grad():
        full = model(ids, mask, image_embeds=emb).logits
        first = model(ids[:, :6], mask[:, :6], image_embeds=emb, use_cache=True)
        second = model(ids[:, 6:8], mask, past_key_values=first.past_key_values, use_cache=True)
        third = model(ids[:, 8:], mask[:, 8:], past_key_values=second.past_key_values, use_cache=True)
    got = torch.cat([first.logits, second.logits, third.logits], 1)
    torch.testing.assert_close(got[0, 3:], full[0, 3:], **TOL)  # row 0's real tokens
    torch.testing.assert_close(got[1], full[1], **TOL)


def test_sliding_window_longer_than_window_raises(model):
    old = model.sliding_window
    model.sliding_window = 8
    try:
        with pytest.raises(ValueError, match="sliding window"):
            model(random_ids(1, 10))
    finally:
        model.sliding_window = old


# --- FLOPs --------------------------------------------------------------------------------------

def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flops_equal_the_plain_lm(llama_dir, clip_dir):
    expert, plain = build(llama_dir, clip_dir), build(llama_dir, clip_dir, shallow=True)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids, emb = random_ids(2, 24), image_embeds(expert, 2)
    L = 24 + expert.num_image_tokens
    with torch.no_grad():
        f_expert = count_flops(lambda: expert(ids, image_embeds=emb))
        f_plain = count_flops(lambda: plain(ids, image_embeds=emb))
        f_hf = count_flops(lambda: hf(input_ids=random_ids(2, L)))
    assert f_expert == f_plain == f_hf > 0


# --- parameters ---------------------------------------------------------------------------------

def test_trainable_set_default_is_experts_and_adapter(model, images):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("adapter.") or ".vision_expert_" in n or ".vision_mlp." in n for n in names)
    per_layer = {n.split(".", 3)[3] for n in names if n.startswith("model.layers.")}
    assert per_layer == {"self_attn.vision_expert_query_key_value.weight", "self_attn.vision_expert_dense.weight",
                         "mlp.vision_mlp.gate_up_proj.weight", "mlp.vision_mlp.down_proj.weight"}
    assert not any(p.requires_grad for p in model.vision.parameters())
    ids = random_ids(2, 6)
    model.zero_grad(set_to_none=True)
    model(ids, pixel_values=model.preprocess(images[:2]), labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is None and model.lm_head.weight.grad is None
    assert model.adapter.down_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.vision_mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_unfrozen_lm_gets_its_lr_multiplier(llama_dir, clip_dir):
    m = build(llama_dir, clip_dir, freeze_lm=False, lm_lr_mult=0.1)
    groups = m.param_groups(lr=1e-3, weight_decay=0.05)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert by_name["model.embed_tokens.weight"] == pytest.approx((1e-4, 0.05))
    assert by_name["model.norm.weight"] == pytest.approx((1e-4, 0.0))
    assert by_name["model.layers.0.self_attn.vision_expert_dense.weight"] == pytest.approx((1e-3, 0.05))
    assert by_name["adapter.gate_up_proj.weight"] == pytest.approx((1e-3, 0.05))
    assert not any(n.startswith("vision.") for n in by_name)
    assert sum(len(g["params"]) for g in groups) == len(m.trainable_parameters()) == len(by_name)
    torch.optim.AdamW(groups)  # accepted as is (the "names" key rides along)


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir, clip_dir):
    ids, pv = random_ids(2, 6), torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m = build(llama_dir, clip_dir, freeze_lm=False, gradient_checkpointing=ckpt).train()
        m(ids, pixel_values=pv, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **TOL)


def test_shallow_has_no_experts_and_trains_only_the_adapter(llama_dir, clip_dir):
    m = build(llama_dir, clip_dir, shallow=True)
    assert not any(".vision_" in n for n, _ in m.named_parameters())
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"adapter"}


def test_trainable_state_dict_round_trips_through_safetensors(llama_dir, clip_dir, tmp_path):
    a = build(llama_dir, clip_dir, seed=1)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_file(a.trainable_state_dict(), str(tmp_path / "trainable.safetensors"))
    b = build(llama_dir, clip_dir, seed=2)
    ids, emb_pixels = random_ids(1, 6), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(ids, pixel_values=emb_pixels).logits, b(ids, pixel_values=emb_pixels).logits)
        b.load_trainable_state_dict(load_file(str(tmp_path / "trainable.safetensors")))
        assert torch.equal(a(ids, pixel_values=emb_pixels).logits, b(ids, pixel_values=emb_pixels).logits)
    with pytest.raises(KeyError):
        b.load_trainable_state_dict({"adapter.down_proj.weight": torch.zeros(1)})
    with pytest.raises(KeyError):
        b.load_trainable_state_dict({"no.such.weight": torch.zeros(1)}, strict=False)


# --- vision tower -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_tower_drops_last_layer_and_cls(kind, llama_dir, clip_dir, siglip_dir, images):
    path = clip_dir if kind == "clip" else siglip_dir
    m = build(llama_dir, path)
    hf = (CLIPVisionModel if kind == "clip" else SiglipVisionModel).from_pretrained(path).eval()
    pv = m.preprocess(images)
    assert pv.shape == (3, 3, 32, 32) and m.num_image_tokens == 16
    with torch.no_grad():
        ours = m.vision(pv)
        ref = hf(pixel_values=pv, output_hidden_states=True).hidden_states[-2]
    ref = ref[:, 1:] if kind == "clip" else ref
    assert len(m.vision.tower.encoder.layers) == hf.config.num_hidden_layers - 1
    torch.testing.assert_close(ours, ref, **TOL)


def test_image_size_override_interpolates_positions(llama_dir, siglip_dir, images):
    m = build(llama_dir, siglip_dir, image_size=64)
    pv = m.preprocess(images[:1])
    assert pv.shape == (1, 3, 64, 64) and m.num_image_tokens == 64
    assert m(random_ids(1, 4), pixel_values=pv).logits.shape[1] == 4 + 64


def test_preprocess_resizes_without_crop_and_normalises(model):
    from PIL import Image
    img = Image.new("RGB", (90, 30), (255, 0, 128))
    x = model.preprocess([img])
    assert x.shape == (1, 3, 32, 32)
    mean, std = torch.tensor(model.image_transform.mean), torch.tensor(model.image_transform.std)
    expect = (torch.tensor([255, 0, 128]) / 255.0 - mean) / std
    torch.testing.assert_close(x[0, :, 16, 16], expect)


# --- generation ---------------------------------------------------------------------------------

def test_greedy_generate_with_cache_equals_recomputing(model, images):
    pv = model.preprocess(images[:1])
    ids = random_ids(1, 5, seed=9)
    got = model.generate(ids, pixel_values=pv, max_new_tokens=6, eos_token_id=-1)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, pixel_values=pv).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert got.tolist() == seq[:, 5:].tolist()


def test_batched_left_padded_generate_equals_one_by_one(model, images):
    prompts = ["Question: Where is the red ball? Answer:", "Photo of"]
    ids, mask = model.tokenize_prompts(prompts)
    pv = model.preprocess(images[:2])
    batched = model.generate(ids, mask, pv, max_new_tokens=5, eos_token_id=-1)
    for i, p in enumerate(prompts):
        one_ids, one_mask = model.tokenize_prompts([p])
        single = model.generate(one_ids, one_mask, pv[i:i + 1], max_new_tokens=5, eos_token_id=-1)
        assert batched[i].tolist() == single[0].tolist()


def test_generate_stops_at_eos_and_pads(model):
    ids = random_ids(2, 4, seed=10)
    first = model.generate(ids, max_new_tokens=1)[:, 0]
    out = model.generate(ids, max_new_tokens=4, eos_token_id=int(first[0]))
    assert out[0, 0] == first[0] and (out[0, 1:] == model.pad_token_id).all()


def test_sampling_is_seeded_and_top_p_small_is_greedy(model):
    ids = random_ids(2, 4, seed=11)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, generator=g(0), eos_token_id=-1)
    b = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, generator=g(0), eos_token_id=-1)
    c = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, generator=g(1), eos_token_id=-1)
    greedy = model.generate(ids, max_new_tokens=8, eos_token_id=-1)
    nucleus = model.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, generator=g(2), eos_token_id=-1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(nucleus, greedy)
    with pytest.raises(ValueError):
        model.generate(ids, do_sample=True, temperature=0.0)


def test_predict_boxes_after_overfitting_one_example(tmp_path, images):
    """End to end: train on one REC pair (BOS + prompt + target + EOS), then predict_boxes parses it."""
    torch.manual_seed(0)
    m = VisualExpertForCausalLM.from_config(dataclasses.replace(write_debug_model(tmp_path), freeze_lm=False, lm_lr_mult=1.0))
    box = (120, 345, 678, 901)
    prompt, target = prompt_and_target(format_question("red ball"), format_answer([box]))
    tok = lambda s: m.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, t_ids = [BOS] + tok(prompt), tok(target) + [m.eos_token_id]
    ids = torch.tensor([p_ids + t_ids])
    labels = torch.tensor([[-100] * len(p_ids) + t_ids])
    pv = m.preprocess(images[:1])
    opt = torch.optim.AdamW(m.param_groups(1e-2, 0.0))
    m.train()
    for _ in range(60):
        loss = m(ids, pixel_values=pv, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert loss.item() < 0.05
    assert m.predict_boxes(images[:1], ["the red ball"]) == [([box], None)]
    assert m.generate_text(images[:1], [prompt])[0] == target
    save_file(m.trainable_state_dict(), str(tmp_path / "trained.safetensors"))  # LM included: it was unfrozen
    images[0].save(tmp_path / "img.png")
    from model.cogvlm import main
    rows = main(["--debug-root", str(tmp_path), "--trainable", str(tmp_path / "trained.safetensors"),
                 "--image", str(tmp_path / "img.png"), "--phrase", "red ball"])
    assert rows[0]["boxes_norm"] == [box] and rows[0]["error"] is None
    w, h = images[0].size
    assert rows[0]["boxes_px"][0] == pytest.approx(((120.5) * w / 1000, 345.5 * h / 1000, 678.5 * w / 1000, 901.5 * h / 1000))


def test_full_clip_checkpoint_loads_its_vision_tower(llama_dir, tmp_path, images):
    """Hub CLIP ids (openai/clip-vit-large-patch14) are full CLIPModel checkpoints: the tower is taken from them."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    tiny_text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    tiny_vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)
    full = CLIPModel(CLIPConfig(text_config=tiny_text, vision_config=tiny_vision, projection_dim=16)).eval()
    full.save_pretrained(str(tmp_path / "clip-full"))
    m = build(llama_dir, str(tmp_path / "clip-full"))
    pv = m.preprocess(images[:1])
    with torch.no_grad():
        ref = full.vision_model(pixel_values=pv, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(m.vision(pv), ref, **TOL)


def test_tokenizer_without_bos_starts_sequences_with_eos(llama_dir, clip_dir, tmp_path):
    """Qwen2's tokenizer has no BOS and no pad token: EOS stands in for both (no new embeddings)."""
    import shutil
    from model.testing import EOS_ID, write_tokenizer
    lm = tmp_path / "lm-no-bos"
    shutil.copytree(llama_dir, lm)
    write_tokenizer(lm, with_bos_and_pad=False)
    m = build(str(lm), clip_dir)
    assert (m.bos_token_id, m.pad_token_id, m.tokenizer.bos_token_id) == (EOS_ID, EOS_ID, EOS_ID)
    ids, mask = m.tokenize_prompts(["Photo of a red ball", "Hi"])
    assert ids[0, 0] == EOS_ID and mask[1, 0] == 0
    assert m.generate(ids, mask, max_new_tokens=2, eos_token_id=-1).shape == (2, 2)


def test_predict_boxes_reports_why_an_answer_does_not_parse(model, images):
    out = model.predict_boxes(images[:2], ["red ball", "the blue box"], max_new_tokens=4)
    assert len(out) == 2 and all(boxes is None and isinstance(reason, str) and reason for boxes, reason in out)
    with pytest.raises(ValueError):
        model.predict_boxes(images[:2], ["red ball"])


def test_bfloat16_weights_keep_fp32_rope_and_track_the_fp32_model(llama_dir, clip_dir, model, images):
    m16 = build(llama_dir, clip_dir, dtype="bfloat16")
    assert m16.model.embed_tokens.weight.dtype == torch.bfloat16 and m16.model.rotary_emb.inv_freq.dtype == torch.float32
    ids, pv = random_ids(1, 8), model.preprocess(images[:1])
    with torch.no_grad():
        lo, hi = m16(ids, pixel_values=pv).logits.float(), model(ids, pixel_values=pv).logits
    assert lo.dtype == torch.float32 and (lo - hi).abs().max() < 0.1 * hi.abs().max()


def test_cli_prints_one_json_row_per_phrase(tmp_path, images, capsys):
    from model.cogvlm import main
    images[0].save(tmp_path / "img.png")
    rows = main(["--debug-root", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.png"),
                 "--phrase", "red ball", "--phrase", "blue box", "--max-new-tokens", "3"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert [r["phrase"] for r in rows] == ["red ball", "blue box"] and len(printed) == 2
    assert all(r["boxes_norm"] is None and r["error"] for r in rows)  # untrained: reasons, not crashes
