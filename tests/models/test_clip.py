"""Flax CLIP text encoders against transformers 5 PyTorch models (float32, tiny random weights)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mixdq_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)
from tests.reference_data import sdxl_turbo
from weights_convert import ConversionError, torch_to_flax
from weights_convert.clip_keys import normalize_clip_keys

TOL = 1e-5
VOCAB, SEQ = 1010, 77
BOS, REAL_EOS = 998, 999  # eos is the highest id of the base vocab, like 49407 in the real one
ADDED = 1005  # a token added after the base vocab: the legacy rule mistakes it for the eos
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    projection_dim=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=SEQ,
    layer_norm_eps=1e-5,
    bos_token_id=BOS,
    pad_token_id=1,
)


def _torch_model(cls, hidden_act, eos_token_id, seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act, eos_token_id=eos_token_id)
    model = cls(config).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: randomise them so their mapping is tested
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, config


def _input_ids(pad_id):
    """Two prompts of different lengths, bos ... eos, padded with pad_id; eos is the highest id."""
    rng = np.random.default_rng(0)
    ids = np.full((2, SEQ), pad_id, dtype=np.int64)
    for row, n in enumerate((5, 40)):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = rng.integers(3, 990, n)
        ids[row, n + 1] = REAL_EOS
    return ids


def _flax(cls, torch_model, hf_config):
    config = CLIPTextConfig.from_dict(hf_config.to_dict())
    model = cls(config)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
    state = normalize_clip_keys({k: v.numpy() for k, v in torch_model.state_dict().items()})
    params = torch_to_flax(state, target["params"], what="clip")
    return model, params


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b.detach().numpy())))


# Pairwise cover of activation x eos rule x model class (each pair of values appears once).
@pytest.mark.parametrize(
    ("hidden_act", "eos_token_id", "projection"),
    [
        ("quick_gelu", 2, False),
        ("gelu", REAL_EOS, False),
        ("quick_gelu", REAL_EOS, True),
        ("gelu", 2, True),
    ],
)
def test_matches_transformers(hidden_act, eos_token_id, projection, record_property):
    t_cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    f_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    tm, hf_config = _torch_model(t_cls, hidden_act, eos_token_id)
    model, params = _flax(f_cls, tm, hf_config)
    # Legacy rule (argmax id) needs eos as the highest id; pad with "!"-like 0 so argmax is the eos.
    # With the real eos id, pad with eos itself (SD1.5 style): the first eos must be chosen.
    ids = _input_ids(pad_id=0 if eos_token_id == 2 else REAL_EOS)
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids), output_hidden_states=True)
        ref_pooled = (tm.text_model if projection else tm)(torch.from_numpy(ids)).pooler_output
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))

    errs = {
        "last_hidden_state": _max_err(out.last_hidden_state, ref.last_hidden_state),
        "pooler_output": _max_err(out.pooler_output, ref_pooled),
    }
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        errs[f"hidden_states[{i}]"] = _max_err(a, b)
    if projection:
        errs["text_embeds"] = _max_err(out.text_embeds, ref.text_embeds)
    else:
        assert out.text_embeds is None
    record_property("max_abs_err", max(errs.values()))
    print(hidden_act, eos_token_id, projection, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs


def test_eos_rules_pick_different_positions():
    """With an added token above eos in the prompt, legacy pooling (eos_token_id 2) takes the
    added token's position and the new rule the first eos; both as transformers does."""
    ids = _input_ids(pad_id=REAL_EOS)
    ids[1, 3] = ADDED
    expected = {2: [6, 3], REAL_EOS: [6, 41]}
    for eos, positions in expected.items():
        tm, hf_config = _torch_model(transformers.CLIPTextModel, "quick_gelu", eos)
        model, params = _flax(CLIPTextModel, tm, hf_config)
        with torch.no_grad():
            ref = tm(torch.from_numpy(ids)).pooler_output
        out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
        assert _max_err(out.pooler_output, ref) <= TOL
        picked = np.asarray(out.last_hidden_state)[[0, 1], positions]
        np.testing.assert_array_equal(np.asarray(out.pooler_output), picked)


def test_attention_mask_matches_transformers():
    tm, hf_config = _torch_model(transformers.CLIPTextModel, "gelu", REAL_EOS)
    model, params = _flax(CLIPTextModel, tm, hf_config)
    ids = _input_ids(pad_id=REAL_EOS)
    mask = (np.arange(SEQ)[None] <= np.array([[6], [41]])).astype(np.int64)
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert _max_err(out.last_hidden_state, ref.last_hidden_state) <= TOL


def test_legacy_text_model_prefix_and_position_ids_load():
    """transformers < 5 files (real sdxl-turbo) carry text_model. and sometimes position_ids."""
    tm, hf_config = _torch_model(transformers.CLIPTextModel, "quick_gelu", 2)
    state = {f"text_model.{k}": v.numpy() for k, v in tm.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.arange(SEQ)[None]
    model = CLIPTextModel(CLIPTextConfig.from_dict(hf_config.to_dict()))
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
    with pytest.raises(ConversionError):
        torch_to_flax(state, target["params"])
    params = torch_to_flax(normalize_clip_keys(state), target["params"])
    ids = _input_ids(pad_id=0)
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids)).last_hidden_state
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    assert _max_err(out.last_hidden_state, ref) <= TOL


def test_normalize_rejects_duplicate_keys():
    with pytest.raises(ValueError, match="final_layer_norm.weight"):
        normalize_clip_keys({"final_layer_norm.weight": 1, "text_model.final_layer_norm.weight": 2})


def test_config_reads_sdxl_turbo_files():
    c1 = CLIPTextConfig.from_json(sdxl_turbo("text_encoder_config.json"))
    c2 = CLIPTextConfig.from_json(sdxl_turbo("text_encoder_2_config.json"))
    assert (c1.hidden_size, c1.num_hidden_layers, c1.hidden_act, c1.eos_token_id) == (
        768,
        12,
        "quick_gelu",
        2,
    )
    assert (c2.hidden_size, c2.num_hidden_layers, c2.hidden_act, c2.projection_dim) == (
        1280,
        32,
        "gelu",
        1280,
    )
    # Full-size parameter count equals transformers' (shapes only, no weights materialised).
    shapes = jax.eval_shape(
        CLIPTextModelWithProjection(c2).init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32)
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    ref_n = sum(p.numel() for p in _meta_model(c2))
    assert n == ref_n


def _meta_model(config):
    hf = transformers.CLIPTextConfig(
        **{k: getattr(config, k) for k in TINY}
        | {"hidden_act": config.hidden_act, "eos_token_id": config.eos_token_id}
    )
    with torch.device("meta"):
        return transformers.CLIPTextModelWithProjection(hf).parameters()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"hidden_size": "768"}, "hidden_size"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
        ({"eos_token_id": None}, "eos_token_id"),
        ({"model_type": "t5"}, "model_type"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, key):
    data = json.loads(sdxl_turbo("text_encoder_config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data | change))
    with pytest.raises(ValueError, match=key):
        CLIPTextConfig.from_json(path)


def test_config_accepts_full_clip_config():
    data = {"model_type": "clip", "text_config": {"hidden_size": 64, "num_attention_heads": 4}}
    assert CLIPTextConfig.from_dict(data).hidden_size == 64


def test_bfloat16_params_and_compute_stay_close_to_transformers():
    tm, hf_config = _torch_model(transformers.CLIPTextModelWithProjection, "gelu", 2)
    config = CLIPTextConfig.from_dict(hf_config.to_dict())
    model = CLIPTextModelWithProjection(config=config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
    assert {x.dtype for x in jax.tree_util.tree_leaves(target)} == {jnp.dtype(jnp.bfloat16)}
    state = normalize_clip_keys({k: v.numpy() for k, v in tm.state_dict().items()})
    params = torch_to_flax(state, target["params"])
    ids = _input_ids(pad_id=0)
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    assert out.text_embeds.dtype == jnp.bfloat16
    err = _max_err(out.last_hidden_state.astype(jnp.float32), ref.last_hidden_state)
    assert err < 0.1, err
