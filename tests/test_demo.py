"""`fusedgru demo` on a tiny run: it learns, the models computing the same function agree,
it writes its figures, and the same seed gives the same numbers.

The tiny run: the first 6,000 characters of the bundled corpus written to tmp_path and read
back with --text, 24 hidden units, minibatches of 8 x 10, 4 epochs (71 steps each), all
four models.  About 5 s on 2 CPU cores per run; the test makes two runs.
"""

import json
import os
import sys

import pytest

from fusedgru import demo

# The two pairs compute the same function from the same weights on the same minibatches;
# only the order of floating-point operations differs (fused kernel vs cuDNN-free
# torch.nn.GRU on the CPU vs the textbook's per-gate matmuls).  Each loss then differs by
# a few fp32 ulps (~1e-7 relative), and 284 SGD steps (lr 1, clipped) do not amplify that
# noticeably: measured max relative differences of the per-epoch perplexities are 1e-8 ..
# 1e-7 here, and below 1e-7 for the default model (H=256) over 10 epochs.  1e-5 leaves two
# orders of margin and is still two orders below the difference between the formulations
# (reset_after=True vs False from the same weights: ~1e-3 to 1e-2 after one epoch), which
# the test checks too, so the bound can tell "same function" from "similar function".
SAME_FUNCTION_RTOL = 1e-5
OTHER_FUNCTION_MIN_DIFF = 1e-3


def _run(tmp_path, text_file, out_name, capsys):
    out = tmp_path / out_name
    argv = ["--text", str(text_file), "--epochs", "4", "--hidden", "24", "--batch-size", "8",
            "--num-steps", "10", "--seed", "3", "--sample-len", "30", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    with open(out / "demo.json") as f:
        return json.load(f), out, printed


@pytest.fixture
def text_file(tmp_path):
    with open(demo.DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read(6000)
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_demo_tiny_run(tmp_path, text_file, capsys):
    figures, out, printed = _run(tmp_path, text_file, "a", capsys)
    models = figures["models"]
    assert list(models) == list(demo.MODEL_NAMES)
    # The textbook's preprocessing: lower-case letters and spaces only.
    assert set(figures["corpus"]["vocabulary"]) <= set(" abcdefghijklmnopqrstuvwxyz")

    # It learns: every model's perplexity falls clearly, epoch by epoch.
    for name, m in models.items():
        ppl = m["perplexity"]
        assert len(ppl) == 4
        assert all(b < a for a, b in zip(ppl, ppl[1:])), (name, ppl)
        assert ppl[-1] < 0.75 * ppl[0], (name, ppl)

    # The same function from the same weights: the curves agree to rounding...
    for a, b in demo.PAIRS:
        pa, pb = models[a]["perplexity"], models[b]["perplexity"]
        assert demo.max_rel_diff(pa, pb) < SAME_FUNCTION_RTOL, (a, b, pa, pb)
        assert figures["agreement"][f"{a} vs {b}"] < SAME_FUNCTION_RTOL
    # ...while the two formulations, from the same weights, visibly differ.
    assert demo.max_rel_diff(models["fusedgru"]["perplexity"],
                             models["fusedgru-textbook"]["perplexity"]) > OTHER_FUNCTION_MIN_DIFF

    # The figures and the report.
    assert os.path.getsize(out / "demo.png") > 1000
    with open(out / "demo.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(figures["speedup"]) == {f"{a} over {b}" for a, b in demo.SPEEDUPS}
    assert all(v > 0 for v in figures["speedup"].values())
    for name, m in models.items():
        assert m["sample"].startswith("and god said ") and len(m["sample"]) == 13 + 30
        assert len(m["seconds"]) == 4 and all(t > 0 for t in m["tokens_per_s"])
        assert name in printed
    assert "final ppl" in printed and "speed-up fusedgru over nn.GRU" in printed

    # Reproducible: the same seed gives the same numbers (timings aside) and samples.
    again, _, _ = _run(tmp_path, text_file, "b", capsys)
    for name, m in models.items():
        assert again["models"][name]["perplexity"] == m["perplexity"], name
        assert again["models"][name]["sample"] == m["sample"], name


def test_demo_without_matplotlib_writes_its_json(tmp_path, text_file, monkeypatch, capsys):
    """matplotlib is optional: without it the demo still finishes, writes demo.json and says
    why there is no demo.png."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "noplot"
    argv = ["--text", str(text_file), "--epochs", "1", "--hidden", "8", "--batch-size", "8",
            "--num-steps", "10", "--models", "fusedgru,nn.GRU", "--sample-len", "5",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    with open(out / "demo.json") as f:
        assert set(json.load(f)["models"]) == {"fusedgru", "nn.GRU"}
    assert not (out / "demo.png").exists()
    assert f"wrote {out / 'demo.json'} (matplotlib is not installed" in printed, printed


def test_batches_cover_the_corpus_without_overlap():
    import random

    import torch

    corpus = torch.arange(1000)
    batches = demo.epoch_batches(corpus, batch_size=4, num_steps=7, rng=random.Random(0))
    xs = torch.cat([x for x, _ in batches]).flatten()
    assert len(batches) == ((1000 - 1 - (xs.min().item())) // 7) // 4
    assert xs.unique().numel() == xs.numel()  # non-overlapping subsequences
    for x, y in batches:
        assert x.shape == y.shape == (4, 7)
        assert torch.equal(y, x + 1)  # targets are the next characters


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--models", "fusedgru,lstm"])
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    assert demo.main(["--text", str(short), "--out", str(tmp_path / "o")]) == 2
    assert "need at least" in capsys.readouterr().err
