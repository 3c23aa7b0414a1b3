"""The LLVC network: upstream state-dict compatibility, offline output, config and loading."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REF
from models.checkpoint import (
    DEFAULT_OUT_SCALE,
    CheckpointError,
    check_state_dict,
    default_model,
    load_model,
    read_state_dict,
)
from models.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config
from models.llvc import LLVC


def _upstream_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (REF / "state_dict_keys.txt").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        assert dtype == "torch.float32"
        keys[name] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return keys


def test_state_dict_names_and_shapes_are_upstreams():
    ours = {k: tuple(v.shape) for k, v in LLVC(load_config()).state_dict().items()}
    upstream = _upstream_keys()
    assert len(upstream) == 147
    assert ours == upstream
    assert sum(int(np.prod(s)) for s in ours.values()) == 3_309_920


def test_default_config_file_is_upstreams_default():
    ours = json.loads(DEFAULT_CONFIG_PATH.read_text())
    upstream = json.loads((REF / "config.json").read_text())
    assert ours["model_params"] == upstream["model_params"]
    assert ours["data"]["sr"] == upstream["data"]["sr"] == 16000


def test_offline_forward_reproduces_upstream(reference):
    with torch.inference_mode():
        y = reference.model(torch.from_numpy(reference.input).view(1, 1, -1)).view(-1).numpy()
    assert y.shape == reference.offline.shape
    assert np.abs(y - reference.offline).max() < 1e-5
    # The fixture is not trivial: the conversion really differs from its input.
    assert np.abs(reference.offline - reference.input).max() > 0.05


def test_offline_forward_keeps_length_for_lengths_off_the_hop_grid(ref_default):
    for n in (208, 209, 1000, 4801):
        x = torch.from_numpy(ref_default.input[:n]).view(1, 1, -1)
        with torch.inference_mode():
            assert ref_default.model(x).shape == (1, 1, n)


def test_bare_state_dict_loads_like_wrapped(tmp_path, ref_default):
    sd = read_state_dict(ref_default.checkpoint)
    torch.save(sd, tmp_path / "bare.pth")
    model, info = load_model(tmp_path / "bare.pth", ref_default.config)
    assert info.trained
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_problems_are_one_line(tmp_path, ref_default):
    sd = read_state_dict(ref_default.checkpoint)
    model = LLVC(load_config(ref_default.config))
    bad = dict(sd)
    del bad["out_conv.0.weight"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model, bad, "ck.pth")
    msg = str(err.value)
    assert msg.startswith("ck.pth: ") and "\n" not in msg
    assert "missing keys 1 (out_conv.0.weight)" in msg and "unexpected keys 1 (extra.weight)" in msg
    bad = dict(sd, **{"in_conv.0.weight": torch.zeros(512, 1, 32)})
    with pytest.raises(CheckpointError, match=r"in_conv.0.weight: checkpoint \(512, 1, 32\), model \(512, 1, 48\)"):
        check_state_dict(model, bad, "ck.pth")
    bad = dict(sd)
    bad["in_conv.0.weight"] = sd["in_conv.0.weight"].clone()
    bad["in_conv.0.weight"][0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        check_state_dict(model, bad, "ck.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.pth: not a loadable PyTorch checkpoint"):
        read_state_dict(tmp_path / "junk.pth")


def test_checkpoint_is_loaded_without_executing_code(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Boom()}, protocol=2))
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint"):
        read_state_dict(path)


def test_default_model_is_seeded_and_not_saturated():
    cfg = load_config()
    a, b = default_model(cfg), default_model(cfg)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    # The global RNG is left alone.
    torch.manual_seed(123)
    r1 = torch.rand(3)
    torch.manual_seed(123)
    default_model(cfg)
    assert torch.equal(torch.rand(3), r1)
    x = torch.from_numpy(np.load(REF / "ref_default_offline.npy")[:8000]).view(1, 1, -1)
    with torch.inference_mode():
        y = a(x).view(-1)
    assert torch.isfinite(y).all() and 1e-3 < y.abs().max() < 0.99
    assert DEFAULT_OUT_SCALE < 1


def test_a_config_without_checkpoint_is_the_untrained_model_and_warns_loudly():
    messages = []
    model, info = load_model(None, DEFAULT_CONFIG_PATH, warn=messages.append)
    assert not info.trained and not info.demo and "untrained" in info.model_id
    assert len(messages) == 1 and "UNTRAINED" in messages[0]
    assert "UNTRAINED" in info.describe()
    reference = default_model(load_config(DEFAULT_CONFIG_PATH))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("change, fragment", [
    ({"L": 0}, "model_params.L: must be a positive integer, got 0"),
    ({"L": -16}, "model_params.L: must be a positive integer"),
    ({"L": 16.0}, "model_params.L: must be a positive integer"),
    ({"enc_dim": True}, "model_params.enc_dim: must be a positive integer"),
    ({"colour": 1}, "unknown key 'colour'"),
    ({"use_pos_enc": "yes"}, "model_params.use_pos_enc: must be true or false"),
    ({"decoder_dropout": 2}, "decoder_dropout: must be a number in [0, 1)"),
    ({"dec_dim": 250}, "dec_dim: must be divisible by the decoder's 8 attention heads"),
    ({"convnet_config": {"kernel_sizes": [3, 3]}}, "must have the same length"),
    ({"convnet_config": {"out_channels": [1] * 11 + [2]}}, "the last entry must be 1"),
    ({"convnet_config": {"skip_connection": "concat"}}, "convnet_config.skip_connection"),
    ({"convnet_config": {"convnet_prenet": True, "depth": 3}}, "convnet_config: unknown key 'depth'"),
])
def test_bad_config_values_are_named(change, fragment):
    raw = json.loads(DEFAULT_CONFIG_PATH.read_text())
    for key, value in change.items():
        if key == "convnet_config":
            raw["model_params"][key].update(value)
        else:
            raw["model_params"][key] = value
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "cfg.json")
    assert fragment in str(err.value) and str(err.value).startswith("cfg.json: ")


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "binary.pth").write_bytes(b"\x80\x02\xff" * 10)
    with pytest.raises(ConfigError, match="binary.pth: not a JSON config"):
        load_config(tmp_path / "binary.pth")
    raw = json.loads(DEFAULT_CONFIG_PATH.read_text())
    raw["data"]["sr"] = 22050
    with pytest.raises(ConfigError, match="16000 Hz only, got 22050"):
        parse_config(raw, "x")
    with pytest.raises(ConfigError, match="missing \"model_params\""):
        parse_config({"data": {"sr": 16000}}, "x")


def test_config_round_trips_through_upstream_layout():
    cfg = load_config()
    assert parse_config(cfg.to_json_dict()) == cfg


def test_grouped_projections_equal_upstreams_grouped_conv(ref_default, monkeypatch):
    from models.llvc import GroupedPointwise

    x = torch.from_numpy(ref_default.input[:4000]).view(1, 1, -1)
    with torch.inference_mode():
        fast = ref_default.model(x)
        for proj in ("proj_e2d_e", "proj_e2d_l", "proj_d2e"):
            block = getattr(ref_default.model.mask_gen, proj)
            h = torch.randn(2, block[0].in_channels, 13)
            assert torch.allclose(block(h), block[1](block[0](h)), atol=1e-6), proj
        monkeypatch.setattr(GroupedPointwise, "upstream_math", True)
        slow = ref_default.model(x)
    assert (fast - slow).abs().max() < 1e-6
