"""--preset alphapruning and the block-wise mapping of prune (docs/presets.md, docs/prune.md).
Oracle: AlphaPruning's ``ww_sparsity`` (lib/prune.py) redone by hand with numpy."""

from __future__ import annotations

import clirunner
import numpy as np
import pytest
import torch

from htsr_cli import analyze

# ------------------------------------------------------------------------------------------
# AlphaPruning: block-wise mapping


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A Llama-shaped checkpoint: embeddings, 4 blocks of 3 Linear layers, the LM head."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    sd = {"model.embed_tokens.weight": torch.randn(96, 64, generator=g)}
    for b in range(4):
        # heavier tails in later blocks, so the blocks' alphas differ
        df = 2.5 + b
        for name, shape in (("self_attn.q_proj", (64, 64)), ("mlp.up_proj", (128, 64))):
            w = torch.distributions.StudentT(df).sample(shape) / 10
            sd[f"model.layers.{b}.{name}.weight"] = w
        sd[f"model.layers.{b}.mlp.down_proj.weight"] = torch.randn(64, 128, generator=g) / 10
    sd["lm_head.weight"] = torch.randn(96, 64, generator=g)
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    save_file(sd, str(path))
    return str(path)


def test_alphapruning_preset_is_its_block_wise_llm_default(tiny_llama):
    """AlphaPruning's ww_sparsity by hand: alpha_peak per layer, block means, the linear map to
    [1 - 0.3, 1 + 0.3], scaled so that sum numel * ratio = sparsity * sum numel."""
    from htsr_cli.prune import prune

    plan = prune(tiny_llama, sparsity=0.5, preset="alphapruning")
    assert plan.params["block_wise"] and plan.params["eps"] == 0.3
    assert plan.params["preset"] == "alphapruning"
    rows = {
        r["name"]: r
        for r in analyze(tiny_llama, preset="alphapruning", metrics="alpha").layers
        if r["name"].startswith("model.layers.")
    }
    names = list(rows)
    numel = np.array([rows[n]["N"] * rows[n]["M"] for n in names], dtype=float)
    alpha = np.array([rows[n]["alpha"] for n in names])
    block = np.repeat([alpha[i : i + 3].mean() for i in range(0, 12, 3)], 3)
    r = (block - block.min()) / (block.max() - block.min()) * 0.6 + 0.7
    expected = r * numel.sum() * 0.5 / (numel * r).sum()
    got = {x.name: x.budget for x in plan.layers}
    assert set(got) == set(names)  # embeddings and the LM head are never pruned
    for n, e in zip(names, expected, strict=True):
        assert got[n] == pytest.approx(e, rel=1e-9), n
    # one ratio per block
    for b in range(4):
        assert len({round(got[n], 12) for n in names if n.startswith(f"model.layers.{b}.")}) == 1


def test_block_pattern_and_layer_wise(tiny_llama):
    from htsr_cli.prune import prune

    layer_wise = prune(tiny_llama, sparsity=0.5, preset="alphapruning", block_wise=False)
    assert len({round(x.budget, 12) for x in layer_wise.layers}) > 4
    # a pattern that puts blocks 0-1 and 2-3 together: two ratios
    pairs = prune(tiny_llama, sparsity=0.5, preset="alphapruning", block_pattern=r"layers\.[01]\.")
    assert pairs.params["block_pattern"] == r"layers\.[01]\."
    # blocks 2 and 3 match nothing: each of their layers keeps its own ratio
    assert any("keep a ratio of their own" in n for n in pairs.notes)
    out = clirunner.run(
        ["prune", tiny_llama, "--sparsity", "0.5", "--preset", "tempbalance", "-f", "json"]
    )
    assert out.returncode == 2 and "does not apply to prune" in out.stderr
    out = clirunner.run(
        ["prune", tiny_llama, "--sparsity", "0.5", "--block-pattern", "(", "-f", "json"]
    )
    assert out.returncode == 2 and "not a regular expression" in out.stderr
