"""The multi-seed ablation (hd.ablation --seeds): the aggregation on hand-computed numbers, and the orchestration
(which directory and seed each run gets, what is written) with the single-seed ablation replaced by a fake, since
a real 2-seed run (two teachers, two sketches, eight refine rows, two evaluations) takes minutes on this CPU."""

from __future__ import annotations

import json
import math
import os

import pytest

from hd import ablation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy2d.py")


def _entry(model: str, fd: float, precision: float | None = 0.5, sampler: str = "mean_flow", steps: int = 1,
           nfe: int = 1) -> dict:
    return dict(model=model, sampler=sampler, steps=steps, nfe=nfe, fd=fd, precision=precision, recall=0.25,
                class_consistency=None, seconds_per_image=1e-3, n_samples=200, feature_net="classifier",
                feature_net_test_accuracy=0.9, workdir=f"/runs/{model}")


def test_aggregate_seeds_on_hand_computed_numbers():
    per_seed = [
        [_entry("teacher", 1.0, sampler="euler", steps=4, nfe=4), _entry("refine", 2.0, precision=0.6)],
        [_entry("teacher", 2.0, sampler="euler", steps=4, nfe=4), _entry("refine", 3.0, precision=0.7)],
        # Rows in another order at this seed: matched by (model, sampler, steps), not by position.
        [_entry("refine", 7.0, precision=0.8), _entry("teacher", 4.0, sampler="euler", steps=4, nfe=4)],
    ]
    summary = ablation.aggregate_seeds(per_seed, [0, 1, 2])
    assert [(e["model"], e["sampler"], e["steps"], e["nfe"]) for e in summary] == [
        ("teacher", "euler", 4, 4), ("refine", "mean_flow", 1, 1)]
    teacher, refine = summary
    # FD 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3, std sqrt(7/3).
    assert teacher["fd"]["values"] == [1.0, 2.0, 4.0]
    assert teacher["fd"]["mean"] == pytest.approx(7 / 3)
    assert teacher["fd"]["std"] == pytest.approx(math.sqrt(7 / 3))
    # FD 2, 3, 7: mean 4; deviations -2, -1, 3 -> 14 / 2 = 7, std sqrt(7). Precision 0.6, 0.7, 0.8: std 0.1.
    assert refine["fd"]["mean"] == pytest.approx(4.0) and refine["fd"]["std"] == pytest.approx(math.sqrt(7))
    assert refine["precision"]["mean"] == pytest.approx(0.7) and refine["precision"]["std"] == pytest.approx(0.1)
    # Identical values: zero spread. A metric missing at the seeds summarises to None.
    assert refine["recall"] == {"mean": 0.25, "std": 0.0, "values": [0.25] * 3}
    assert refine["class_consistency"] == {"mean": None, "std": None, "values": [None] * 3}
    assert refine["seeds"] == [0, 1, 2] and refine["workdirs"] == ["/runs/refine"] * 3

    table = ablation.seed_table(summary)
    assert "| teacher | euler | 4 | 4 | 2.333 ± 1.528 |" in table
    assert ("| refine | mean_flow | 1 | 1 | 4.000 ± 2.646 | 0.700 ± 0.100 | 0.250 ± 0.000 | – | 1.000 ± 0.000 |"
            in table)

    one = ablation.aggregate_seeds(per_seed[:1], [5])  # one seed: no spread to report
    assert one[0]["fd"] == {"mean": 1.0, "std": None, "values": [1.0]}
    assert "| 1.000 |" in ablation.seed_table(one)


def test_aggregate_seeds_rejects_seeds_with_other_rows():
    with pytest.raises(ValueError, match="seed 1 scored rows .* every seed must score the same rows"):
        ablation.aggregate_seeds([[_entry("a", 1.0)], [_entry("b", 1.0)]], [0, 1])
    with pytest.raises(ValueError, match="one list per seed"):
        ablation.aggregate_seeds([[_entry("a", 1.0)]], [0, 1])


def test_seeds_orchestration_runs_each_seed_in_its_directory(tmp_path, monkeypatch):
    calls = []

    def fake_one_seed(config_path, workdir, profile, overrides, feature_workdir=None, write=True):
        calls.append(dict(workdir=workdir, overrides=overrides, feature_workdir=feature_workdir, write=write))
        seed = int(overrides[-1].split("=")[1])
        return [_entry("teacher", 1.0 + seed, sampler="euler", steps=4, nfe=4), _entry("refine", 2.0 + 2 * seed)]

    monkeypatch.setattr(ablation, "_run_one_seed", fake_one_seed)
    workdir = str(tmp_path / "work")
    summary = ablation.run_ablation(CONFIG, workdir, "tiny", ("batch_size=32",), seeds=3)

    assert [c["workdir"] for c in calls] == [workdir, f"{workdir}/seed_1", f"{workdir}/seed_2"]
    assert [c["overrides"] for c in calls] == [("batch_size=32", f"seed={s}") for s in range(3)]
    assert all(c["feature_workdir"] == f"{workdir}/eval" and c["write"] is False for c in calls)
    with open(tmp_path / "work" / "ablation" / "ablation.json") as f:
        stored = json.load(f)
    assert stored == summary
    assert stored[1]["fd"]["values"] == [2.0, 4.0, 6.0] and stored[1]["fd"]["std"] == pytest.approx(2.0)
    md = (tmp_path / "work" / "ablation" / "ablation.md").read_text()
    assert md.startswith("Mean ± sample standard deviation (ddof=1) over seeds 0, 1, 2")
    assert "| refine | mean_flow | 1 | 1 | 4.000 ± 2.000 |" in md
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "work" / "ablation"))


@pytest.mark.parametrize("seeds, overrides, message", [
    (0, (), r"--seeds=0 must be a positive integer"),
    (2, ("seed=3",), r"--seeds sets each run's seed .*drop --set seed="),
    (2, ("no_such_key=1",), r"no_such_key"),
])
def test_seeds_bad_input_fails_before_anything_runs(tmp_path, monkeypatch, seeds, overrides, message):
    monkeypatch.setattr(ablation, "_run_one_seed", lambda *a, **k: pytest.fail("must not run"))
    with pytest.raises(ValueError, match=message):
        ablation.run_ablation(CONFIG, str(tmp_path / "work"), "tiny", overrides, seeds=seeds)
    assert not (tmp_path / "work").exists()
