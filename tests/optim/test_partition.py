"""Optimizer labels from parameter names and shapes, plain and under layer scan."""

import jax
import pytest

from optim import default_label, label_params
from optim._tree import join, path_names

EXPECTED_BY_SUFFIX = {
    "embed/embedding": "adam",
    "lm_head/kernel": "adam",
    "final_norm/scale": "adam",
    "attn_norm/scale": "adam",
    "mlp_norm/scale": "adam",
    "q_a_norm/scale": "adam",
    "kv_a_norm/scale": "adam",
    "q_norm/scale": "adam",
    "q_proj/bias": "adam",
    "router/kernel": "adam",
    "router_bias": "none",
    "q_proj/kernel": "muon",
    "k_proj/kernel": "muon",
    "v_proj/kernel": "muon",
    "o_proj/kernel": "muon",
    "q_a_proj/kernel": "muon",
    "q_b_proj/kernel": "muon",
    "kv_a_proj/kernel": "muon",
    "kv_b_proj/kernel": "muon",
    "gate_proj/kernel": "muon",
    "up_proj/kernel": "muon",
    "down_proj/kernel": "muon",
    "experts/w_gate": "muon",
    "experts/w_up": "muon",
    "experts/w_down": "muon",
}


def _expected(path: str) -> str:
    matches = [s for s in EXPECTED_BY_SUFFIX if path.endswith(s)]
    assert len(matches) == 1, (path, matches)
    return EXPECTED_BY_SUFFIX[matches[0]]


@pytest.mark.parametrize("which", ["plain", "scanned"])
def test_default_labels(which, request):
    params = request.getfixturevalue(which)
    labels = label_params(params)
    flat, _ = jax.tree_util.tree_flatten_with_path(labels)
    assert len(flat) == len(jax.tree.leaves(params))
    seen = set()
    for kp, lab in flat:
        path = join(path_names(kp))
        assert lab == _expected(path), path
        seen.add(next(s for s in EXPECTED_BY_SUFFIX if path.endswith(s)))
    assert seen == set(EXPECTED_BY_SUFFIX)  # the fake tree covers every rule


def test_scanned_norm_scale_is_adam_despite_ndim_2():
    assert default_label(("moe_stack", "attn_norm", "scale"), (2, 16)) == "adam"
    assert default_label(("moe_stack", "mlp", "router", "kernel"), (2, 16, 4)) == "adam"
    assert default_label(("moe_stack", "mlp", "experts", "w_up"), (2, 4, 16, 32)) == "muon"
    assert default_label(("moe_stack", "mlp", "router_bias"), (2, 4)) == "none"
    # Unknown names are left to AdamW, whatever their shape; a 1-D kernel is not a matrix.
    assert default_label(("pos_table",), (8, 16)) == "adam"
    assert default_label(("x", "kernel"), (16,)) == "adam"


def test_overrides_first_match_wins_and_validate(plain):
    params = plain
    labels = label_params(
        params,
        overrides=[(r"lm_head/kernel$", "muon"), (r"layers_1/.*/experts/", "adam"), (r"lm_head", "none")],
    )
    assert labels["lm_head"]["kernel"] == "muon"
    assert labels["layers_1"]["mlp"]["experts"]["w_up"] == "adam"
    assert labels["layers_0"]["mlp"]["up_proj"]["kernel"] == "muon"
    with pytest.raises(ValueError, match="label must be one of"):
        label_params(params, overrides=[("lm_head", "sgd")])
    with pytest.raises(ValueError, match="not a valid regex"):
        label_params(params, overrides=[("(", "adam")])
