"""The whole pipeline on the tiny 2-D profile: every stage end to end, skip on rerun, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time


import numpy as np
from PIL import Image

from hd import ablation, pipeline, visualize
from hd.checkpoint import latest_step
from hd.eval.curves import read_scalar_curves

from conftest import complete_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy2d.py")


def test_pipeline_runs_every_stage_then_skips_everything(tmp_path, monkeypatch):
    entries = pipeline.run_pipeline(CONFIG, str(tmp_path), "tiny")
    rows = {(e["model"], e["sampler"], e["steps"]) for e in entries}
    assert rows == {("teacher", "euler", 1), ("teacher", "euler", 4), ("teacher", "heun", 2),
                    ("sketch", "mean_flow", 1), ("sketch", "mean_flow", 2),
                    ("refine", "mean_flow", 1), ("refine", "mean_flow", 2)}
    with open(tmp_path / "eval" / "results.json") as f:
        stored = json.load(f)
    assert stored == entries
    required = {"model", "sampler", "steps", "nfe", "fd", "precision", "recall", "class_consistency",
                "seconds_per_image", "n_samples", "feature_net", "feature_net_test_accuracy", "grid"}
    for e in stored:
        assert required <= set(e), required - set(e)
        assert e["n_samples"] == 200 and e["fd"] >= 0 and 0 <= e["precision"] <= 1 and 0 <= e["recall"] <= 1
        assert 0 <= e["class_consistency"] <= 1 and e["seconds_per_image"] > 0 and e["feature_net"] == "classifier"
        assert e["nfe"] == {"euler": e["steps"], "heun": 2 * e["steps"] - 1, "mean_flow": e["steps"]}[e["sampler"]]
        assert os.path.exists(e["grid"])
    assert (tmp_path / "eval" / "results.md").read_text().count("\n| ") == len(entries) + 1
    configs = pipeline.stage_configs(CONFIG, str(tmp_path), "tiny")
    for stage in ("teacher", "sketch", "refine"):
        assert latest_step(str(tmp_path / stage)) == configs[stage].num_steps
    # Cost columns: a guided sampler call is two forward passes, and XLA's FLOP count says the same (teacher and
    # students are one network).
    guided = configs["eval"].eval.cfg_scale != 1.0
    by_row = {(e["model"], e["sampler"], e["steps"]): e for e in stored}
    for e in stored:
        assert e["forward_passes"] == e["nfe"] * (2 if guided and e["sampler"] != "mean_flow" else 1)
        assert e["gflop_per_image"] > 0
    ratio = by_row[("teacher", "euler", 4)]["gflop_per_image"] / by_row[("refine", "mean_flow", 1)]["gflop_per_image"]
    assert abs(ratio / by_row[("teacher", "euler", 4)]["forward_passes"] - 1) < 0.05, ratio
    # AWD heat maps are drawn over images only (tests/test_heatmaps.py): none for 2-D points.
    assert all("awd_heatmap" not in e for e in stored)

    # The ablation on the same work directory trains only its three extra refine rows (the full-HD row is the
    # pipeline's refine stage) and scores every row with the same evaluation.
    import hd.eval.evaluator
    import hd.train.loop

    trained = []
    real_train = hd.train.loop.train
    monkeypatch.setattr(hd.train.loop, "train",
                        lambda config, workdir: trained.append(workdir) or real_train(config, workdir))
    ablation_entries = ablation.run_ablation(CONFIG, str(tmp_path), "tiny")
    assert sorted(os.path.basename(w) for w in trained) == ["sketch_dmd", "sketch_dmd_gap", "teacher_dmd_awd"]
    assert [(e["model"], e["sampler"], e["steps"]) for e in ablation_entries] == [
        ("teacher", "euler", 1), ("teacher", "euler", 4), ("sketch_only", "mean_flow", 1),
        ("teacher_dmd_awd", "mean_flow", 1), ("sketch_dmd", "mean_flow", 1), ("sketch_dmd_gap", "mean_flow", 1),
        ("sketch_dmd_awd", "mean_flow", 1)]
    with open(tmp_path / "ablation" / "ablation.json") as f:
        assert json.load(f) == ablation_entries
    assert (tmp_path / "ablation" / "ablation.md").read_text().count("\n| ") == len(ablation_entries) + 1
    awd = next(e for e in ablation_entries if e["model"] == "sketch_dmd_awd")
    assert awd["workdir"] == str(tmp_path / "refine")
    for name in ("teacher_dmd_awd", "sketch_dmd", "sketch_dmd_gap"):
        assert latest_step(str(tmp_path / "ablation" / name)) == configs["refine"].num_steps
    with open(tmp_path / "ablation" / "teacher_dmd_awd" / "config.json") as f:
        no_sketch = json.load(f)["refine"]
    assert no_sketch["generator_init"] == "teacher"

    # A second invocation trains and evaluates nothing.

    def fail(*args, **kwargs):
        raise AssertionError("the second invocation must not train or evaluate")

    monkeypatch.setattr(hd.train.loop, "train", fail)
    monkeypatch.setattr(hd.eval.evaluator, "evaluate", fail)
    assert pipeline.run_pipeline(CONFIG, str(tmp_path), "tiny") == entries


def test_pipeline_resumes_after_a_stage_is_killed(tmp_path):
    workdir = str(tmp_path)
    command = [sys.executable, "-m", "hd.pipeline", f"--config={CONFIG}", f"--workdir={workdir}", "--profile=tiny",
               "--set=num_steps=300", "--set=checkpoint_every=50", "--set=log_every=50"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    refine = os.path.join(workdir, "refine")
    deadline = time.monotonic() + 240
    try:
        while not complete_checkpoints(refine):
            assert process.poll() is None, "the pipeline ended before the refine stage saved a checkpoint"
            assert time.monotonic() < deadline, "no refine checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = complete_checkpoints(refine)
    assert saved and saved[-1] < 300, "killed too late to test a resume"
    finished_stages = {s: os.path.getmtime(os.path.join(workdir, s, "checkpoints", "300")) for s in ("teacher", "sketch")}

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed refine from step {saved[-1]}" in result.stderr
    assert "teacher: finished earlier" in result.stderr and "sketch: finished earlier" in result.stderr
    for stage, mtime in finished_stages.items():  # finished stages were not touched
        assert os.path.getmtime(os.path.join(workdir, stage, "checkpoints", "300")) == mtime
    assert complete_checkpoints(refine)[-1] == 300
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        assert len(json.load(f)) == 7


def test_training_scores_samples_every_n_steps(tmp_path):
    from conftest import load_config
    from hd.train.loop import train

    config = load_config("toy2d", "tiny", {"eval_every": 10, "eval.num_samples": 200, "eval.classifier_steps": 30})
    metrics = train(config, str(tmp_path / "teacher"))
    for key in ("eval/fd", "eval/precision", "eval/recall", "eval/class_consistency"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert metrics["eval/fd"] >= 0 and 0 <= metrics["eval/class_consistency"] <= 1
    assert (tmp_path / "teacher" / "eval" / "feature_net" / "classifier.json").exists()
    # The same scores read back from the event files, at every eval_every step and the last one.
    curves = read_scalar_curves(str(tmp_path / "teacher"))
    steps = [s for s, _ in curves["eval/fd"]]
    assert steps == sorted({*range(config.eval_every, config.num_steps + 1, config.eval_every), config.num_steps})
    for key in ("eval/fd", "eval/recall"):
        assert abs(curves[key][-1][1] - metrics[key]) <= 1e-6 * max(1.0, abs(metrics[key]))


def test_ablation_writes_refine_curves(tmp_path):
    curves = {"teacher_dmd_awd": {"eval/fd": [(125, 9.5), (250, 4.25)], "eval/recall": [(125, 0.1), (250, 0.3)]},
              "sketch_dmd_awd": {"eval/fd": [(125, 3.0), (250, 2.5)], "eval/recall": [(250, 0.5)]},
              "sketch_dmd": {}}  # a row that wrote no scores has no column
    ablation.write_curves(curves, str(tmp_path))
    with open(tmp_path / "curves.json") as f:
        assert json.load(f) == {k: {t: [list(p) for p in v] for t, v in c.items()} for k, c in curves.items()}
    table = (tmp_path / "curves.md").read_text().splitlines()
    assert table[2] == "| refine step | teacher_dmd_awd | sketch_dmd_awd |"
    assert table[4:] == ["| 125 | 9.500 / 0.100 | 3.000 / – |", "| 250 | 4.250 / 0.300 | 2.500 / 0.500 |"]
    chart = np.asarray(Image.open(tmp_path / "curves.png"))
    assert chart.shape == (420, 720, 3)
    for colour in visualize._PALETTE[:2]:  # one line per row with scores
        assert (chart == colour).all(axis=-1).sum() > 50
    assert not (chart == visualize._PALETTE[2]).all(axis=-1).any()


def test_stages_score_with_the_evaluation_classifier(tmp_path):
    """hd.pipeline points every trained stage's in-training scorer at the evaluation's classifier cache: it is
    trained once, by the first stage that scores, and found by the next instead of trained again."""
    from conftest import load_config
    from hd.train.loop import train

    configs = pipeline.stage_configs(CONFIG, str(tmp_path), "tiny")
    assert {configs[s].eval.feature_dir for s in pipeline.TRAINED} == {str(tmp_path / "eval")}
    assert configs["eval"].eval.feature_dir == ""  # the evaluation caches in its own directory
    shared = tmp_path / "eval"
    overrides = {"eval_every": 3, "eval.num_samples": 200, "eval.classifier_steps": 30,
                 "eval.feature_dir": str(shared)}
    first = train(load_config("toy2d", "tiny", overrides), str(tmp_path / "a"))
    record = shared / "feature_net" / "classifier.json"
    stamp = record.stat().st_mtime_ns
    second = train(load_config("toy2d", "tiny", {**overrides, "seed": 1}), str(tmp_path / "b"))
    assert record.stat().st_mtime_ns == stamp  # found, not retrained
    assert not (tmp_path / "a" / "eval").exists() and not (tmp_path / "b" / "eval").exists()
    assert first["eval/fd"] >= 0 and second["eval/fd"] >= 0 and first["eval/fd"] != second["eval/fd"]
