"""The experiment suite (bnext.experiments): tiny end-to-end runs of both commands, resume, measurement
invariance, torchrun with 2 CPU processes (the claim rules are pinned in tests/test_claims.py)."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnext.experiments import analysis, common, dln, train, vgg
from bnext.experiments.config import parse_config
from bnext.experiments.models import build_vgg, paper_layer, vgg_layer_names
from bnext.experiments.report import parse_claims
from bnext.experiments.runner import Experiment, execute

VERDICTS = {analysis.REPRODUCED, analysis.NOT_REPRODUCED, analysis.INCONCLUSIVE}
TINY_VGG = ["--dataset", "synthetic", "--no-download", "--width", "0.0625", "--batch-size", "32",
            "--train-size", "256", "--test-size", "64", "--steps", "6", "--eval-every", "3", "--measure-every", "3",
            "--checkpoint-every", "2", "--lrs", "0.1", "--ics-lrs", "0.01", "--probe-points", "3",
            "--no-progress", "--threads", "2", "--procs", "1", "--seeds", "0"]
TINY_DLN = ["--depth", "6", "--dim", "4", "--points", "64", "--steps", "12", "--measure-every", "6",
            "--ics-layers", "2,4", "--hist-layers", "2,4", "--probe-points", "3", "--checkpoint-every", "4", "--no-progress", "--procs", "1", "--seeds", "0"]


def _cfg(module, argv):
    cls = vgg.VGGConfig if module is vgg else dln.DLNConfig
    return parse_config(cls, module.PRESETS, argv, "test", "test")


def _run(module, argv):
    cfg = _cfg(module, argv)
    if module is vgg:
        return execute(Experiment("vgg", cfg, vgg.VGGTask, vgg.specs, vgg.make_report, list(argv), check=vgg.check_data))
    return execute(Experiment("dln", cfg, dln.DLNTask, dln.specs, dln.make_report, list(argv), dln.DLN_COLUMNS))


def _check_report(out: Path, expected_claims, figures):
    for name in ["config.json", "summary.json", "report.md"] + figures:
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    rows = parse_claims(text)
    assert [r["id"] for r in rows] == expected_claims
    assert all(r["verdict"] in VERDICTS for r in rows), rows
    assert all(r["rule"] and r["measured"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [c["verdict"] for c in summary["claims"]] == [r["verdict"] for r in rows]
    assert "Data:" in text and "torch" in text and "bnext" in text
    for fig in figures:
        assert f"]({fig})" in text
    return rows, summary


def test_vgg_end_to_end_every_artifact(tmp_path):
    out = tmp_path / "vgg"
    argv = TINY_VGG + ["--out", str(out), "--lr-sweep", "--sweep-lrs", "0.1,1e6", "--sweep-steps", "3",
                       "--norms", "none,bn,noisy_bn,l1,l2,linf", "--curvature", "--curvature-iters", "2"]
    code = _run(vgg, argv)
    assert code == 0
    figs = ["fig1_accuracy.png", "fig1_histograms.png", "fig2_noisy_bn.png", "fig2_histograms.png",
            "fig4_landscape.png", "fig_lp_curves.png", "fig_drift.png", "fig_lr_sweep.png", "fig3_ics.png",
            "fig_curvature.png"]
    rows, summary = _check_report(out, ["1", "2", "2 (noise alone)", "3", "4 (early)", "4 (late)", "5", "6", "1b", "4b"], figs)
    stats = summary["data_source"]["statistics"]  # the synthetic data's pixel statistics travel with the results
    assert set(stats) == {"neighbour_correlation", "difference_kurtosis", "channel_mean", "channel_std"}
    assert json.loads((out / "config.json").read_text())["data_source"]["statistics"] == stats
    runs = {s["run_id"]: s for s in summary["runs"]}
    assert "main-bn-lr0.1-s0" in runs and "main-none-lr0.01-s0" in runs and "main-noise-lr0.1-s0" in runs
    # a huge LR diverges and is recorded as such, not a crash
    div = runs["sweep-none-lr1e+06-s0"]
    assert div["diverged"] and div["diverged_step"] is not None
    recs = common.read_jsonl(out / "runs" / "sweep-none-lr1e+06-s0" / "metrics.jsonl")
    assert recs[-1]["type"] == "diverged"
    recs = common.read_jsonl(out / "runs" / "main-bn-lr0.1-s0" / "metrics.jsonl")
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(6))
    # the quick preset's VGG-11: 8 conv layers; the paper's #2, #3, #9, #11, #13 are its #1, #2, #5, #7, #8
    assert len(train[1]["drift_mean"]) == 8 and all(v is not None for v in train[1]["drift_mean"])
    meas = [r for r in recs if r["type"] == "measure"]
    assert [m["step"] for m in meas] == [0, 3, 5]
    assert sorted(meas[0]["hist"], key=int) == ["1", "2", "5", "7", "8"]
    assert len(meas[0]["ics"]) == 8 and len(meas[0]["probe"]["losses"]) == 3
    assert meas[0]["thm41"] is not None
    # the drift's probe batch: the input of every conv after the first (7 of them), with its sampling floor
    assert len(meas[0]["probe_stats"]) == 7
    assert all(len(v["mean"]) == len(v["std"]) and v["floor"] is not None for v in meas[0]["probe_stats"].values())
    assert runs["main-bn-lr0.1-s0"]["drift_probe"] is not None
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    # rerunning the same command skips every finished run and rewrites the same claims
    before = (out / "runs" / "main-bn-lr0.1-s0" / "metrics.jsonl").read_bytes()
    assert _run(vgg, argv) == 0
    assert (out / "runs" / "main-bn-lr0.1-s0" / "metrics.jsonl").read_bytes() == before
    assert [r["verdict"] for r in parse_claims((out / "report.md").read_text())] == [r["verdict"] for r in rows]


def test_dln_end_to_end(tmp_path):
    out = tmp_path / "dln"
    assert _run(dln, TINY_DLN + ["--out", str(out), "--lrs", "1e-6", "--ics-lrs", "1e-7"]) == 0
    figs = ["dln_loss.png", "dln_drift.png", "dln_ics.png", "dln_landscape.png", "dln_histograms.png"]
    _, summary = _check_report(out, ["1 (DLN)", "3 (DLN)", "4 (DLN) (early)", "4 (DLN) (late)", "5 (DLN)", "6"], figs)
    by_id = {s["run_id"]: s for s in summary["runs"]}
    assert by_id["main-bn-lr1e-06-s0"]["drift"] > 0 and by_id["main-none-lr1e-06-s0"]["drift"] > 0
    # the probe-batch drift: between the measurements at steps 0, 6 and 11, at the inputs of linear #2..#6
    assert by_id["main-none-lr1e-06-s0"]["drift_probe"] > 0
    assert len(by_id["main-none-lr1e-06-s0"]["drift_probe_layers"]) == 5
    ids = {s["run_id"] for s in summary["runs"]}
    assert {"main-none-lr1e-06-s0", "main-bn-lr1e-06-s0", "main-none-lr1e-07-s0", "main-bn-lr1e-07-s0"} <= ids


def test_config_rejects_unknown_flags_and_applies_presets():
    with pytest.raises(SystemExit):
        _cfg(vgg, ["--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        _cfg(vgg, ["--norms", "bn,batchnorm"])
    cfg = _cfg(vgg, ["--preset", "paper", "--steps", "7"])
    assert (cfg.arch, cfg.width, cfg.steps, cfg.train_size, cfg.out) == ("vgg16", 1.0, 7, 0, "runs/vgg-paper")
    assert cfg.seeds == [0, 1, 2] and cfg.hist_layers == [2, 3, 9, 11, 13] and cfg.ics_layers == [5, 10]
    cfg = _cfg(vgg, [])
    assert cfg.batch_size == 128 and cfg.momentum == 0.0 and cfg.init == "glorot" and cfg.lrs == [0.1, 0.5]
    # three seeds by default; only the runs that can decide a claim (experiments README, "Quick preset")
    assert cfg.seeds == [0, 1, 2] and cfg.ics_lrs == [] and cfg.channels_last
    ids = [s.run_id for s in vgg.specs(cfg)]
    assert len(ids) == 27 and "main-none-lr0.5-s2" in ids and "main-l1-lr0.5-s0" not in ids
    assert "main-noise-lr0.1-s1" in ids and "main-noisy_bn-lr0.1-s2" in ids
    assert cfg.arch == "vgg11" and cfg.hist_layers == [1, 2, 5, 7, 8] and cfg.ics_layers == [3, 6]
    assert len(cfg.eta_multipliers()) == 8 and math.isclose(cfg.eta_multipliers()[-1], 4.0)
    assert _cfg(vgg, ["--arch", "vgg13"]).ics_layers == [5, 8]
    d = _cfg(dln, [])
    assert (d.depth, d.dim, d.points, d.steps, d.lrs, d.ics_lrs) == (25, 10, 1000, 4000, [1e-7], [])
    # the paper's regime: summed loss at LR 1e-7, probes no longer than the training step, three seeds
    assert d.loss_reduction == "sum" and max(d.eta_multipliers()) <= 1.0 and d.seeds == [0, 1, 2]
    assert (d.hist_layers, d.ics_layers, d.eval_every, d.device, d.threads) == ([9, 17], [9, 17], 0, "cpu", 1)
    assert _cfg(dln, ["--preset", "paper"]).steps == 10000 and _cfg(dln, ["--preset", "paper"]).seeds == [0, 1, 2]
    # the VGG and DLN configs share their common options through one base class
    from bnext.experiments.config import BaseConfig
    shared = {f.name for f in dataclasses.fields(BaseConfig)}
    own_vgg = {f.name for f in dataclasses.fields(vgg.VGGConfig)} - shared
    own_dln = {f.name for f in dataclasses.fields(dln.DLNConfig)} - shared
    assert "steps" in shared and "arch" in own_vgg and "depth" in own_dln and not own_vgg & own_dln
    assert d.loss_reduction == "sum" and _cfg(dln, ["--loss-reduction", "mean"]).loss_reduction == "mean"


def test_dln_loss_is_the_squared_error_summed_or_averaged_over_points():
    model = torch.nn.Linear(3, 2, bias=False)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    model.double()
    w = model.weight.detach()
    err = [sum((float(w[o] @ x[i]) - float(y[i, o])) ** 2 for o in range(2)) for i in range(5)]
    assert math.isclose(dln.squared_error("sum")(model, (x, y)).item(), sum(err), rel_tol=1e-12)
    assert math.isclose(dln.squared_error("mean")(model, (x, y)).item(), sum(err) / 5, rel_tol=1e-12)


def test_out_dir_with_a_different_config_is_refused(tmp_path):
    argv = TINY_VGG + ["--out", str(tmp_path), "--norms", "bn", "--lrs", "0.1", "--ics-lrs", "0.1",
                       "--measure-every", "0"]
    assert _run(vgg, argv) == 0
    with pytest.raises(SystemExit, match="different configuration"):
        _run(vgg, argv + ["--width", "0.125"])


def _records(path):
    return [r for r in common.read_jsonl(path)]


@pytest.mark.parametrize("norm", ["bn", "noisy_bn", "none"])
def test_resume_follows_the_uninterrupted_trajectory(tmp_path, monkeypatch, norm):
    argv = TINY_VGG + ["--norms", norm, "--ics-norms", norm, "--ics-lrs", "0.1", "--steps", "7",
                       "--save-weights"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(vgg, argv + ["--out", str(a)]) == 0
    batch = vgg.VGGTask.batch

    def ctrl_c_at_step_5(self, spec, step):
        if step == 5:
            raise KeyboardInterrupt
        return batch(self, spec, step)
    with monkeypatch.context() as m:
        m.setattr(vgg.VGGTask, "batch", ctrl_c_at_step_5)
        assert _run(vgg, argv + ["--out", str(b)]) == 130
    run = f"main-{norm}-lr0.1-s0"
    assert (b / "runs" / run / "checkpoint.pt").exists() and not (b / "runs" / run / "summary.json").exists()
    assert _run(vgg, argv + ["--out", str(b)]) == 0
    ra, rb = _records(a / "runs" / run / "metrics.jsonl"), _records(b / "runs" / run / "metrics.jsonl")
    assert ra == rb  # every loss, accuracy, activation statistic and measurement, bit for bit
    wa = torch.load(a / "runs" / run / "final.pt", weights_only=True)
    wb = torch.load(b / "runs" / run / "final.pt", weights_only=True)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sb = json.loads((b / "runs" / run / "summary.json").read_text())
    assert sb["state"]["resumed_from"] == [4]


@pytest.mark.parametrize("norm", ["bn", "noisy_bn", "none"])
def test_measurement_does_not_change_the_trajectory(tmp_path, norm):
    cfg = _cfg(vgg, TINY_VGG + ["--curvature", "--curvature-iters", "2"])
    task = vgg.VGGTask(cfg, torch.device("cpu"))
    results = []
    for every, where in ((1, "measured"), (0, "plain")):
        spec = common.RunSpec(norm, 0.1, 0, 3)
        run_cfg = dataclasses.replace(cfg, measure_every=every, eval_every=2, checkpoint_every=0, save_weights=True)
        train.run_one(run_cfg, spec, tmp_path / where, task, torch.device("cpu"))
        recs = _records(tmp_path / where / "metrics.jsonl")
        results.append(([r for r in recs if r["type"] in ("train", "eval")],
                        torch.load(tmp_path / where / "final.pt", weights_only=True),
                        sum(r["type"] == "measure" for r in recs)))
    (ta, wa, na), (tb, wb, nb) = results
    assert na == 3 and nb == 0
    assert ta == tb
    torch.manual_seed(0)
    w0 = task.build_model(common.RunSpec(norm, 0.1, 0, 3)).state_dict()
    assert not torch.equal(w0["classifier.weight"], wa["classifier.weight"])  # it did train
    for k in wa:  # weights and BN running statistics (num_batches_tracked included)
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not found")
def test_torchrun_two_cpu_processes_share_the_grid(tmp_path):
    out = tmp_path / "tr"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    argv = TINY_VGG + ["--out", str(out), "--norms", "none,bn", "--steps", "3", "--measure-every", "0",
                       "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "bnext.experiments.vgg"] + argv,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["world"] == 2
    # 2 norms x (0.1 + ICS LR 0.01) + the noise-injected plain network at 0.1, split over 2 ranks
    assert len(summary["runs"]) == 5
    assert proc.stdout.count("report:") == 1  # only rank 0 writes the report
    assert parse_claims((out / "report.md").read_text())


# ------------------------------------------------------------------------------ claims table


def test_claims_table_round_trips_through_markdown():
    from bnext.experiments.report import claims_markdown
    claims = [analysis.Claim("1", "a | b", "rule with |x|", "measured 1 | 2", analysis.REPRODUCED),
              analysis.Claim("3 (DLN)", "c", "r", "m", analysis.INCONCLUSIVE)]
    rows = parse_claims("intro\n\n" + claims_markdown(claims) + "\n\nafter")
    assert rows == [{"id": "1", "claim": "a | b", "rule": "rule with |x|", "measured": "measured 1 | 2",
                     "verdict": analysis.REPRODUCED},
                    {"id": "3 (DLN)", "claim": "c", "rule": "r", "measured": "m", "verdict": analysis.INCONCLUSIVE}]


def test_vgg_layout_and_conversion():
    m = build_vgg("bn", 0.125, arch="vgg16")
    names = vgg_layer_names(m)
    assert len(names["conv"]) == 13 and len(names["norm"]) == 13
    import bnext
    assert all(isinstance(dict(m.named_modules())[n], bnext.nn.BatchNorm2d) for n in names["norm"])
    widths = [dict(m.named_modules())[n].out_channels for n in names["conv"]]
    assert widths == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    none = build_vgg("none", 0.125)
    assert all(isinstance(dict(none.named_modules())[n], torch.nn.Identity) for n in vgg_layer_names(none)["norm"])
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # VGG-11: one conv in the first two blocks, two in the others
    m11 = build_vgg("bn", 0.125, arch="vgg11")
    convs = [dict(m11.named_modules())[n] for n in vgg_layer_names(m11)["conv"]]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert m11(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(vgg_layer_names(build_vgg("none", 0.125, arch="vgg19"))["conv"]) == 16
    # the layer standing for the paper's: same block, same relative place (first/last kept)
    assert [paper_layer(k, "vgg16") for k in range(1, 14)] == list(range(1, 14))
    assert [paper_layer(k, "vgg11") for k in (2, 3, 5, 9, 10, 11, 13)] == [1, 2, 3, 5, 6, 7, 8]
    assert [paper_layer(k, "vgg19") for k in (1, 5, 7, 8, 10, 11, 13)] == [1, 5, 8, 9, 12, 13, 16]
    with pytest.raises(ValueError, match="1..13"):
        paper_layer(14, "vgg11")


def test_plain_network_noise_follows_algorithm_1():
    from bnext.experiments.models import ChannelNoise
    torch.manual_seed(0)
    noise = ChannelNoise().train()
    C = 4000
    # x = 1: out = s + m, so per channel the mean is sigma_j + mu_j and the within-channel variance is
    # r_sigma^2 + (2 r_mu)^2 / 12; across channels the means spread with var(mu_j) + var(sigma_j).
    out = noise(torch.ones(16, C, 8, 8, dtype=torch.float64))
    flat = out.transpose(0, 1).reshape(C, -1)
    within = flat.var(1).mean().item()
    assert abs(within - (0.1 ** 2 + 0.2 ** 2 / 12)) < 0.03 * (0.1 ** 2 + 0.2 ** 2 / 12)
    means = flat.mean(1)
    assert abs(means.mean().item() - (0.0 + 1.125)) < 0.02
    assert abs(means.var().item() - (1.0 ** 2 / 12 + 0.25 ** 2 / 12)) < 0.1 * (1.0 / 12 + 0.25 ** 2 / 12)
    # x = 0: out = m, inside [-n_mu - r_mu, n_mu + r_mu]
    zero = noise(torch.zeros(2, 50, 4, 4, dtype=torch.float64))
    assert zero.abs().max().item() <= 0.6 and zero.abs().max().item() > 0.4
    # eval mode: identity; each training call draws anew
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(noise.eval()(x), x)
    noise.train()
    assert not torch.equal(noise(x), noise(x))
    m = build_vgg("noise", 0.0625)
    assert sum(isinstance(mod, ChannelNoise) for mod in m.modules()) == 13
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())


def test_atomic_writes_leave_no_partial_file(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    common.atomic_write_json(p, {"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads(p.read_text()) == {"a": None, "b": [1.0, None]}

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RuntimeError):
        common.atomic_write_text(p, "new")
    assert json.loads(p.read_text())["a"] is None
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------------------ the command line


def _command(module, *args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, "-m", f"bnext.experiments.{module}", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_an_unsafe_pickle_is_one_line_before_any_worker_starts(tmp_path):
    class RunsShell:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "batches.meta").write_bytes(__import__("pickle").dumps(RunsShell(), protocol=2))
    # the default --procs 2 would start two torchrun workers: the check comes first
    line = _one_error_line(_command("vgg", "--data-dir", str(tmp_path / "cifar"), "--out", str(tmp_path / "o")),
                           "batches.meta", "unsafe pickle: refused to load global")
    assert "system" in line and not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


def test_missing_or_corrupt_data_and_bad_options_are_one_line(tmp_path):
    _one_error_line(_command("vgg", "--dataset", "cifar10", "--no-download", "--data-dir", str(tmp_path / "none"),
                             "--out", str(tmp_path / "o")), "CIFAR-10 not found in", str(tmp_path / "none"))
    batches = tmp_path / "bad" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "batches.meta").write_bytes(b"not a pickle")
    _one_error_line(_command("vgg", "--data-dir", str(tmp_path / "bad"), "--no-download", "--out",
                             str(tmp_path / "o")), "batches.meta", "corrupt")
    _one_error_line(_command("vgg", "--norms", "bn,batchnorm"), "--norms", "batchnorm")
    _one_error_line(_command("vgg", "--arch", "vgg12"), "--arch")
    _one_error_line(_command("vgg", "--no-such-flag"), "--no-such-flag")
    _one_error_line(_command("vgg", "--steps", "0"), "--steps")
    _one_error_line(_command("dln", "--hist-layers", "25"), "--hist-layers")


def test_logs_off_a_terminal_are_plain_lines(tmp_path):
    out = tmp_path / "log"
    proc = _command("vgg", *[a for a in TINY_VGG if a != "--no-progress"], "--norms", "bn", "--ics-norms", "bn",
                    "--no-plain-noise", "--steps", "8", "--measure-every", "0", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "\r" not in text and "\x1b" not in text  # no tqdm redraws
    lines = [ln for ln in proc.stdout.splitlines() if "main-bn-lr" in ln and ": " in ln and ln.startswith("[")]
    for run in ("main-bn-lr0.1-s0", "main-bn-lr0.01-s0"):
        mine = [ln for ln in lines if f"] {run}: " in ln]
        assert mine[0].endswith(": start (8 steps)") and ": done in " in mine[-1], mine
        assert [ln.split(": ", 1)[1].split(",")[0] for ln in mine[1:-1]] == ["step 2/8", "step 4/8", "step 6/8"]
