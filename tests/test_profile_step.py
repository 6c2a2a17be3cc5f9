"""hd.tools.profile_step on the tiny DiT: the optimised-HLO summary counts what the model computes, and the
trace's per-op times add up."""

import jax
import jax.numpy as jnp
import pytest

from hd.costs import cost_dict
from hd.models.dit import DIT_SIZES
from hd.tools import profile_step as ps
from tests.conftest import load_config


@pytest.fixture(scope="module")
def config():
    return load_config("fashion_mnist", "teacher_tiny")


def _block_summary(config):
    fn, args = ps.block_program(config)
    return ps.hlo_summary(jax.jit(fn).lower(*args).compile().as_text()), fn, args


def test_block_summary_counts_every_matmul_of_the_block(config):
    summary, _, _ = _block_summary(config)
    hidden, _, heads = DIT_SIZES[config.model.size]
    tokens = (28 // config.model.patch_size) ** 2
    m = summary["matmuls"]
    # Forward: adaLN, qkv, q k^T, w v, proj, fc1, fc2 = 7 dots; backward: two per dot (both operands need
    # gradients: parameters, tokens and conditioning are all differentiated).
    assert (m["dot"], m["convolution"]) == (21, 0)
    assert m["flops"] == 3 * ps.block_matmul_flops(config.batch_size, tokens, hidden, heads, config.model.mlp_ratio)
    # Every top-level op is counted once, in one kind and one category.
    assert sum(summary["kinds"].values()) == summary["top_level_ops"]
    assert sum(c["count"] for c in summary["categories"].values()) == summary["top_level_ops"]
    assert {r["category"] for r in summary["ops"].values()} <= set(ps.CATEGORIES)
    assert summary["categories"]["matmul"]["count"] == sum(r["category"] == "matmul"
                                                           for r in summary["ops"].values())
    # The matmul ops hold all 21 dots between them, each op's FLOPs being those of its dots.
    assert sum(len(r["dots"]) for r in summary["ops"].values() if r["category"] == "matmul") == 21
    assert sum(r["flops"] for r in summary["ops"].values() if r["category"] == "matmul") == m["flops"]
    assert summary["data_movement"]["count"] == summary["categories"]["copy/transpose"]["count"]


def test_teacher_summary_and_flop_share(config):
    fn, args = ps.teacher_program(config)
    summary = ps.hlo_summary(jax.jit(fn).lower(*args).compile().as_text())
    depth = DIT_SIZES[config.model.size][1]
    # The patch embedding (a convolution) and its kernel gradient; the images get no gradient.
    assert summary["matmuls"]["convolution"] == 2
    # At least the blocks' 21 dots each; the embedders and final layer add more.
    assert summary["matmuls"]["dot"] >= 21 * depth
    assert sum(c["count"] for c in summary["categories"].values()) == summary["top_level_ops"]
    total = ps.lowered_cost(fn, args)["flops"]
    assert 0.5 < summary["matmuls"]["flops"] / total < 1.0


def test_matmul_flops_agree_with_xla_cost_analysis():
    a = jnp.ones((3, 40, 24))
    b = jnp.ones((3, 24, 56))
    w = jnp.ones((56, 8))
    fn = lambda a, b, w: jnp.einsum("bij,bjk->bik", a, b) @ w
    compiled = jax.jit(fn).lower(a, b, w).compile()
    summary = ps.hlo_summary(compiled.as_text())
    assert summary["matmuls"]["flops"] == 2 * 3 * 40 * 24 * 56 + 2 * 3 * 40 * 56 * 8
    assert summary["matmuls"]["flops"] == pytest.approx(cost_dict(compiled.cost_analysis())["flops"], rel=0.02)


def test_thread_timelines_are_split_into_innermost_pieces_and_shared_wall_time():
    # One thread: a task region [0, 10) of op A holding op B's thunk [2, 5); another thread runs C over [4, 8).
    pieces = ps._innermost_segments([(0, 10, "A"), (2, 5, "B")])
    assert pieces == [(0, 2, "A"), (2, 5, "B"), (5, 10, "A")]
    wall = ps._split_wall(pieces + [(4, 8, "C")])
    # [4, 5): B and C share; [5, 8): A and C share; the rest is one op's alone.
    assert wall == pytest.approx({"A": 2 + 1.5 + 2, "B": 2 + 0.5, "C": 0.5 + 1.5})
    assert sum(wall.values()) == pytest.approx(10)


def test_trace_attributes_time_to_the_ops_of_the_hlo(config, tmp_path):
    fn, args = ps.block_program(config)
    run = ps.profile_program(fn, args, "tiny_block", str(tmp_path), steps=2, warmup=1)
    summary = ps.hlo_summary(run["hlo_text"])
    assert run["module"] == "jit_tiny_block" and (tmp_path / "tiny_block.hlo.txt").exists()
    assert run["times"]["runs"] == 2 and run["times"]["events"] > 0
    times = ps.time_by_category(summary, run["times"])
    assert times["unmatched_ops"] == []
    assert times["wall_ns_per_step"]["matmul"] > 0
    assert sum(times["wall_share"].values()) == pytest.approx(1.0)
    # Ops run within the steps: the wall time with an op running is at most the steps' own.
    assert times["wall_total_ns_per_step"] * 1e-9 <= max(run["step_s"]) * 1.05
