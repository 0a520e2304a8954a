"""The ``fastrnn`` command: every subcommand in a short mode, what it writes, and bad arguments
ending with one line on stderr and a non-zero exit (never a traceback)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastrnn.cli import main

ROOT = Path(__file__).resolve().parents[1]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, learnable text: short Python-like lines from a fixed generator."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "index", "name", "(", ")", ":", "=", "+", "if"]
    lines = []
    while sum(len(s) + 1 for s in lines) < 12_000:
        lines.append(" ".join(rng.choice(words, size=rng.integers(3, 9))))
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TINY = [
    "--hidden",
    "16",
    "--layers",
    "2",
    "--embedding",
    "8",
    "--seq-len",
    "12",
    "--batch-size",
    "4",
    "--no-progress",
]


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short char-rnn training run shared by the checks below."""
    tmp = tmp_path_factory.mktemp("run")
    out, summary = tmp / "ckpt", tmp / "summary.json"
    code = main(
        [
            "char-rnn",
            "train",
            "--text",
            str(corpus),
            *TINY,
            "--steps",
            "24",
            "--eval-every",
            "10",
            "--sample-every",
            "12",
            "--sample-length",
            "30",
            "--out",
            str(out),
            "--json",
            str(summary),
            "--seed",
            "1",
        ]
    )
    assert code == 0
    return {"out": out, "summary": summary, "corpus": corpus}


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------


def test_info_reports_build_threads_blas_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info")
    assert code == 0, err
    import fastrnn

    assert out.startswith(f"fastrnn {fastrnn.__version__}")
    for label in ("build:", "threads:", "BLAS:", "GPU:"):
        assert label in out
    assert f"{fastrnn.get_num_threads()} (fastrnn.set_num_threads" in out


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    modules = info["build"]["cpu_modules"]
    assert set(modules) == {"recurrent", "inference", "_train", "conv2d", "conv2d_im2col", "pool2d"}
    # every one is built here (the test command installs them): none may be reported missing
    assert all(modules.values()), [name for name, facts in modules.items() if not facts]
    assert info["build"]["openmp"] in (True, False, None)
    assert isinstance(info["blas"], list)
    assert isinstance(info["gpu"]["available"], bool)
    if not info["gpu"]["available"]:
        assert info["gpu"]["reason"]


def test_python_dash_m_fastrnn_info() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fastrnn", "info"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fastrnn ")


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "char-rnn" in out and "bench" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("fastrnn ")


def test_no_command_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert_one_line_error(code, err, "required")
    code, _, err = run(capsys, "frobnicate")
    assert_one_line_error(code, err, "frobnicate")


# ------------------------------------------------------------------------------------------------
# char-rnn train / sample
# ------------------------------------------------------------------------------------------------


def test_train_writes_checkpoint_summary_and_plot(trained: dict[str, Path]) -> None:
    out, summary = trained["out"], trained["summary"]
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["format"] == "fastrnn.char-rnn"
    assert meta["progress"]["step"] == 24
    assert [h["step"] for h in meta["history"]] == [10, 20, 24]
    text = trained["corpus"].read_text()
    assert meta["model"]["vocab"] == "".join(sorted(set(text)))
    assert meta["model"]["hidden"] == 16 and meta["model"]["layers"] == 2
    weights = out / meta["files"]["weights"]["name"]
    assert weights.exists() and (out / meta["files"]["optimizer"]["name"]).exists()
    assert sorted(p.name for p in out.glob("weights-*.npz")) == [weights.name]  # old ones gone
    from fastrnn import io

    state = io.load(weights)
    assert state["lstm.weight_hh_l1"].shape == (64, 16)
    assert state["head.weight"].shape == (len(meta["model"]["vocab"]), 16)

    s = json.loads(summary.read_text())
    assert s["steps"] == 24 and s["step"] == 24
    assert s["chars_per_second"] > 0
    entropy = s["unigram_entropy_bits_per_char"]
    assert 0 < s["val_bits_per_char"] < 2 * entropy and 0 < s["train_bits_per_char"]
    assert s["corpus"]["val_chars"] > 0 and s["corpus"]["train_chars"] > s["corpus"]["val_chars"]
    assert isinstance(s["sample"], str) and len(s["sample"]) > 400
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_prints_samples_and_entropy(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys,
        "char-rnn",
        "train",
        "--text",
        str(corpus),
        *TINY,
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--sample-every",
        "3",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    assert "unigram entropy" in out and "bits/char" in out
    assert "----- sample at step 3 -----" in out + err
    assert "validation" in out + err


def test_sample_from_checkpoint(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "char-rnn",
        "sample",
        "--checkpoint",
        str(trained["out"]),
        "--length",
        "40",
        "--temperature",
        "0.5",
        "--prime",
        "def ",
        "--seed",
        "3",
    ]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    text = out[:-1]  # print's newline
    assert text.startswith("def ") and len(text) == 44
    vocab = json.loads((trained["out"] / "checkpoint.json").read_text())["model"]["vocab"]
    assert set(text) <= set(vocab)
    code, again, _ = run(capsys, *args)
    assert again == out  # the same seed gives the same text
    code, other, _ = run(capsys, *args[:-1], "4")
    assert code == 0 and len(other) == len(out)


def test_overwrite_starts_again(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "again"
    shutil.copytree(trained["out"], out)
    code, _, err = run(
        capsys,
        "char-rnn",
        "train",
        "--text",
        str(trained["corpus"]),
        *TINY,
        "--steps",
        "3",
        "--sample-every",
        "0",
        "--out",
        str(out),
        "--overwrite",
    )
    assert code == 0, err
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["progress"]["step"] == 3 and [h["step"] for h in meta["history"]] == [3]
    assert [p.name for p in out.glob("weights-*.npz")] == ["weights-0000003.npz"]


def test_resume_continues_the_step_count(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    code, stdout, err = run(
        capsys,
        "char-rnn",
        "train",
        "--text",
        str(trained["corpus"]),
        "--no-progress",
        "--steps",
        "4",
        "--sample-every",
        "0",
        "--out",
        str(out),
        "--resume",
    )
    assert code == 0, err
    assert "resuming at step 24" in stdout
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["progress"]["step"] == 28
    assert meta["model"]["hidden"] == 16  # the size comes from the checkpoint
    assert [h["step"] for h in meta["history"]][-1] == 28
    assert [p[0] for p in meta["train_curve"]] == [25]  # one point per 25 steps, across runs


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--steps", "-1"], ["--steps", "positive"]),
        (["--steps", "0"], ["--steps"]),
        (["--steps", "many"], ["--steps"]),
        (["--lr", "0"], ["--lr"]),
        (["--dropout", "1.5"], ["--dropout"]),
        (["--minutes", "-2"], ["--minutes"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_train_bad_numbers(
    argv: list[str],
    needles: list[str],
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(
        capsys, "char-rnn", "train", "--text", str(corpus), "--out", str(tmp_path / "o"), *argv
    )
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_train_bad_text_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o")
    code, _, err = run(
        capsys, "char-rnn", "train", "--text", str(tmp_path / "nope.txt"), "--out", out
    )
    assert_one_line_error(code, err, "--text", "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "char-rnn", "train", "--text", str(empty), "--out", out)
    assert_one_line_error(code, err, "--text", "empty")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    code, _, err = run(capsys, "char-rnn", "train", "--text", str(binary), "--out", out)
    assert_one_line_error(code, err, "--text", "binary")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 100)
    code, _, err = run(capsys, "char-rnn", "train", "--text", str(latin1), "--out", out)
    assert_one_line_error(code, err, "--text", "not UTF-8")
    short = tmp_path / "short.txt"
    short.write_text("hello world\n")
    code, _, err = run(capsys, "char-rnn", "train", "--text", str(short), "--out", out)
    assert_one_line_error(code, err, "corpus has 12 characters")
    code, _, err = run(capsys, "char-rnn", "train", "--text", str(tmp_path), "--out", out)
    assert_one_line_error(code, err, "--text", "not a regular file")


def test_train_refuses_to_overwrite_or_resume_mismatched(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(trained["out"])
    code, _, err = run(capsys, "char-rnn", "train", "--text", str(trained["corpus"]), "--out", out)
    assert_one_line_error(code, err, "--resume", "--overwrite")
    code, _, err = run(capsys, "char-rnn", "train", "--out", out, "--resume", "--overwrite")
    assert_one_line_error(code, err, "exclude")
    code, _, err = run(
        capsys,
        "char-rnn",
        "train",
        "--text",
        str(trained["corpus"]),
        "--out",
        out,
        "--resume",
        "--hidden",
        "32",
    )
    assert_one_line_error(code, err, "--hidden 32", "16")
    other = tmp_path / "other.txt"
    other.write_text(trained["corpus"].read_text()[::-1])
    code, _, err = run(capsys, "char-rnn", "train", "--text", str(other), "--out", out, "--resume")
    assert_one_line_error(code, err, "--resume", "trained on")
    code, _, err = run(capsys, "char-rnn", "train", "--out", str(tmp_path / "fresh"), "--resume")
    assert_one_line_error(code, err, "--resume", "no such directory")


def test_sample_bad_arguments(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(trained["out"])
    for temperature in ("0", "-1", "nan"):
        code, _, err = run(
            capsys, "char-rnn", "sample", "--checkpoint", ckpt, "--temperature", temperature
        )
        assert_one_line_error(code, err, "--temperature")
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", ckpt, "--length", "-5")
    assert_one_line_error(code, err, "--length")
    code, _, err = run(
        capsys, "char-rnn", "sample", "--checkpoint", ckpt, "--prime", "\u00e9\u00e9"
    )
    assert_one_line_error(code, err, "--prime", "vocabulary")
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", ckpt, "--prime", "")
    assert_one_line_error(code, err, "--prime")
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "--checkpoint", "no such directory")
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(tmp_path))
    assert_one_line_error(code, err, "checkpoint.json")


def test_sample_refuses_foreign_and_corrupt_checkpoints(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    # a checkpoint of another model (the digits CNN)
    digits_dir = tmp_path / "digits"
    pytest.importorskip("sklearn")
    code, _, err = run(
        capsys,
        "digits",
        "--epochs",
        "1",
        "--channels",
        "2",
        "--no-progress",
        "--out",
        str(digits_dir),
    )
    assert code == 0, err
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(digits_dir))
    assert_one_line_error(code, err, "another model", "fastrnn.digits")

    # weights that no longer match the recorded SHA-256
    bad = tmp_path / "bad"
    shutil.copytree(trained["out"], bad)
    meta = json.loads((bad / "checkpoint.json").read_text())
    weights = bad / meta["files"]["weights"]["name"]
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(bad))
    assert_one_line_error(code, err, "SHA-256")

    # a JSON that describes another model size than the weights hold
    wrong = tmp_path / "wrong"
    shutil.copytree(trained["out"], wrong)
    meta = json.loads((wrong / "checkpoint.json").read_text())
    meta["model"]["hidden"] = 24
    (wrong / "checkpoint.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(wrong))
    assert_one_line_error(code, err, "do not fit")

    # a JSON without an entry the checkpoint needs
    partial = tmp_path / "partial"
    shutil.copytree(trained["out"], partial)
    meta = json.loads((partial / "checkpoint.json").read_text())
    del meta["corpus"]
    (partial / "checkpoint.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(partial))
    assert_one_line_error(code, err, "lacks the entry 'corpus'")

    # not JSON at all
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "checkpoint.json").write_text("{not json")
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(junk))
    assert_one_line_error(code, err, "JSON")


def _tampered(trained: dict[str, Path], tmp_path: Path, name: str, edit) -> Path:
    import shutil

    d = tmp_path / name
    shutil.copytree(trained["out"], d)
    meta = json.loads((d / "checkpoint.json").read_text())
    edit(d, meta)
    (d / "checkpoint.json").write_text(json.dumps(meta))
    return d


def test_sample_refuses_file_names_outside_the_checkpoint(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib
    import os
    import shutil
    import signal

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    meta0 = json.loads((trained["out"] / "checkpoint.json").read_text())
    weights0 = trained["out"] / meta0["files"]["weights"]["name"]
    outside = tmp_path / "outside.npz"
    shutil.copy(weights0, outside)

    def named(name: str, digest: str | None = None):
        def edit(d: Path, meta: dict) -> None:
            meta["files"]["weights"] = {"name": name, "sha256": digest or sha(outside)}

        return edit

    # a path up and out of the directory, an absolute path (both with a matching digest), the
    # files a hostile checkpoint might name: each refused before anything is opened
    cases = {
        "up": "../outside.npz",
        "absolute": str(outside),
        "passwd": "/etc/passwd",
        "zero": "/dev/zero",
        "sub": "sub/../w.npz",
        "dots": "..",
    }
    for label, name in cases.items():
        d = _tampered(trained, tmp_path, label, named(name))
        code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(d))
        assert_one_line_error(code, err, "not a plain file name")

    # a symlink inside the directory pointing out of it, and a FIFO: refused, never followed
    # or waited on (the alarm turns a hang into a failure)
    link = _tampered(trained, tmp_path, "link", named("w.npz"))
    os.symlink(outside, link / "w.npz")
    fifo = _tampered(trained, tmp_path, "fifo", named("w.npz"))
    os.mkfifo(fifo / "w.npz")
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(30)
    try:
        for d in (link, fifo):
            code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(d))
            assert_one_line_error(code, err, "regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_sample_refuses_model_sizes_out_of_range(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "huge": ("hidden", 100_000, "model.hidden"),
        "negative": ("hidden", -5, "model.hidden"),
        "text": ("layers", "2", "model.layers"),
        "boolean": ("embedding", True, "model.embedding"),
        "vocab": ("vocab", 17, "model.vocab"),
        "dropout": ("dropout", 1.5, "model.dropout"),
    }
    for label, (key, value, needle) in cases.items():

        def edit(d: Path, meta: dict, key=key, value=value) -> None:
            meta["model"][key] = value

        d = _tampered(trained, tmp_path, label, edit)
        code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(d))
        assert_one_line_error(code, err, needle)

    # in range, but more weights than the file holds: refused before the model is built
    def big(d: Path, meta: dict) -> None:
        meta["model"]["hidden"] = 4096
        meta["model"]["layers"] = 8

    d = _tampered(trained, tmp_path, "big", big)
    code, _, err = run(capsys, "char-rnn", "sample", "--checkpoint", str(d))
    assert_one_line_error(code, err, "do not fit")


def test_checkpoint_files_follow_the_umask(corpus: Path, tmp_path: Path) -> None:
    import os
    import stat

    previous = os.umask(0o022)
    try:
        out = tmp_path / "ckpt"
        code = main(
            ["char-rnn", "train", "--text", str(corpus), *TINY, "--steps", "2",
             "--eval-every", "2", "--sample-every", "0", "--out", str(out)]
        )
        assert code == 0
    finally:
        os.umask(previous)
    files = sorted(p for p in out.iterdir() if p.is_file())
    assert {p.suffix for p in files} >= {".json", ".npz"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p.name, oct(p.stat().st_mode))


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def test_digits_short_run_and_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    summary = tmp_path / "digits.json"
    code, out, err = run(
        capsys,
        "digits",
        "--epochs",
        "2",
        "--channels",
        "4",
        "--no-progress",
        "--search",
        "2",
        "--search-epochs",
        "1",
        "--json",
        str(summary),
    )
    assert code == 0, err
    assert "validation accuracy" in out + err and "test accuracy" in out
    s = json.loads(summary.read_text())
    assert len(s["search"]) == 2
    assert s["hyperparameters"] == max(s["search"], key=lambda t: t["val_accuracy"])["params"]
    assert len(s["history"]) == 2
    assert 0.0 <= s["test_accuracy"] <= 1.0
    assert s["sizes"]["train"] + s["sizes"]["val"] + s["sizes"]["test"] == 1797
    # two epochs of a tiny CNN already beat chance (10%) by far
    assert s["val_accuracy"] > 0.5


def test_digits_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "digits", "--epochs", "0")
    assert_one_line_error(code, err, "--epochs")
    code, _, err = run(capsys, "digits", "--dropout", "1")
    assert_one_line_error(code, err, "--dropout")
    code, _, err = run(capsys, "digits", "--weight-decay", "-1")
    assert_one_line_error(code, err, "--weight-decay")


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def test_bench_quick_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    code, out, err = run(
        capsys,
        "bench",
        "--quick",
        "--ops",
        "lstm,max_pool2d",
        "--threads",
        "1",
        "--min-time",
        "0.001",
        "--no-gpu",
        "--json",
        str(path),
        *(["--plot", str(tmp_path / "bench.png")] if HAVE_MATPLOTLIB else []),
    )
    assert code == 0, err
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "fastrnn ms" in out and "% sgemm" in out
    result = json.loads(path.read_text())
    assert result["machine"]["threads"] == 1 and result["machine"]["sgemm_gflops"] > 0
    ops = {r["op"] for r in result["rows"]}
    assert ops == {"lstm", "max_pool2d"}
    for r in result["rows"]:
        if r["impl"] == "numpy":
            assert r["ms"] > 0 and r["gflops"] > 0
        if r["impl"] in ("fastrnn", "torch") and r["ms"] is not None:
            assert r["check"] == "ok", r  # outputs agree with the reference
    if any(r["impl"] == "torch" and r["ms"] for r in result["rows"]):
        assert "torch/fastrnn" in out


def test_bench_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "bench", "--ops", "lstm,warp")
    assert_one_line_error(code, err, "--ops", "warp")
    code, _, err = run(capsys, "bench", "--threads", "0")
    assert_one_line_error(code, err, "--threads")
    code, _, err = run(capsys, "bench", "--json", str(tmp_path))
    assert_one_line_error(code, err, "--json", "directory")


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------


def test_default_corpus_is_deterministic_python_source() -> None:
    from fastrnn.examples.corpus import stdlib_corpus, stdlib_files, stdlib_root

    a = stdlib_corpus(budget=300_000)
    b = stdlib_corpus(budget=300_000)
    assert a.sha256 == b.sha256 and a.text == b.text
    assert 200_000 < len(a.text) <= 300_000 + len(stdlib_files())  # joins add one newline each
    assert a.text.isascii()
    assert "def " in a.text and "import " in a.text
    names = [p.relative_to(stdlib_root()).as_posix() for p in stdlib_files()]
    assert names and names == sorted(names)
    assert not any(
        part in ("site-packages", "test", "tests") for n in names for part in n.split("/")[:-1]
    )


def test_unexpected_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastrnn.examples import sysinfo

    def broken() -> dict:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(sysinfo, "collect", broken)
    code, _, err = run(capsys, "info")
    assert_one_line_error(code, err, "RuntimeError", "boom second line")


def test_progress_fallback_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import io

    from fastrnn.examples._common import Progress

    real_import = builtins.__import__

    def no_tqdm(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("tqdm"):
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    stream = io.StringIO()
    bar = Progress(3, "demo", "step", stream=stream)
    for _ in range(3):
        bar.update(1, loss=1.5)
    bar.write("a sample")
    bar.close()
    text = stream.getvalue()
    assert "demo: 3/3 step" in text and "loss=1.5" in text and "a sample" in text


def test_training_threads_chosen_and_restored(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    import fastrnn
    from fastrnn.examples import _common

    before = fastrnn.get_num_threads()
    code, out, err = run(
        capsys, "digits", "--epochs", "1", "--channels", "2", "--no-progress", "--threads", "1"
    )
    assert code == 0, err
    assert "threads: 1 (--threads)" in out
    assert fastrnn.get_num_threads() == before

    cpus = _common.available_cpus()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with _common.training_threads(None) as choice:
        assert fastrnn.get_num_threads() == cpus and str(choice).startswith(f"{cpus} (auto")
        assert choice.auto == (cpus > 1)
    assert fastrnn.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with _common.training_threads(None) as choice:
        assert not choice.auto and str(choice).endswith("(OMP_NUM_THREADS)")


class _FakeMachine:
    """A clock and a training step whose duration depends on fastrnn's thread count: ``ms``
    maps a thread count to the milliseconds one step takes on this pretend machine."""

    def __init__(self, ms: dict[int, float]) -> None:
        self.ms, self.now, self.calls = ms, 0.0, []

    def timer(self) -> float:
        return self.now

    def step(self) -> None:
        import fastrnn

        n = fastrnn.get_num_threads()
        self.calls.append(n)
        self.now += self.ms[n] / 1e3


@pytest.mark.parametrize(
    "ms, expected",
    [
        ({1: 60.0, 4: 35.0}, 4),  # an idle machine: all CPUs are faster
        ({1: 60.0, 4: 140.0}, 1),  # a busy core stalls every parallel step: one thread
    ],
)
def test_thread_choice_by_measurement(ms: dict[int, float], expected: int) -> None:
    import fastrnn
    from fastrnn.examples import _common

    before = fastrnn.get_num_threads()
    machine = _FakeMachine(ms)
    choice = _common.ThreadChoice(4, "auto: 4 CPUs", auto=True)
    try:
        assert choice.measure(machine.step, timer=machine.timer, rounds=3) == expected
        assert fastrnn.get_num_threads() == expected
    finally:
        fastrnn.set_num_threads(before)
    assert choice.n == expected
    assert sorted(set(machine.calls)) == [1, 4] and len(machine.calls) == 2 + 2 * 3
    note = str(choice)
    assert note.startswith(f"{expected} (measured: ")
    assert f"{ms[4]:.1f} ms per step on 4 threads" in note and f"{ms[1]:.1f} ms on 1" in note


def test_thread_choice_not_measured_when_given() -> None:
    from fastrnn.examples import _common

    machine = _FakeMachine({1: 1.0, 2: 1.0})
    choice = _common.ThreadChoice(2, "--threads", auto=False)
    assert choice.measure(machine.step, timer=machine.timer) == 2
    assert machine.calls == [] and str(choice) == "2 (--threads)"


def test_char_rnn_header_names_the_measured_choice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With no --threads, the header line says how many threads the timing of the first steps
    picked, and both timings."""
    from fastrnn.examples import _common

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_common, "available_cpus", lambda: 2)
    code, out, err = run(
        capsys,
        *("char-rnn", "train", "--steps", "2", "--hidden", "16", "--embedding", "8"),
        *("--seq-len", "8", "--batch-size", "4", "--no-progress", "--sample-every", "0"),
        *("--out", str(tmp_path / "run")),
    )
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("model:"))
    assert "threads: " in header and "(measured: " in header and "ms on 1" in header


def test_gpu_report_without_the_cuda_backend_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastrnn info` asks CuPy itself when fastrnn._cuda.info is missing (same keys)."""
    from fastrnn.examples import sysinfo

    real = sysinfo.importlib.import_module

    def without_info(name: str, *args: object) -> object:
        if name == "fastrnn._cuda.info":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(sysinfo.importlib, "import_module", without_info)
    info = sysinfo.gpu_info()
    assert info["source"] == "cupy"
    assert {"available", "reason", "cupy", "cuda_runtime", "device"} <= set(info)
    if not info["available"]:
        assert info["reason"]
    line = sysinfo.format_report({**sysinfo.collect(), "gpu": info}).splitlines()[-2]
    assert line.startswith("GPU:")


def test_minutes_budget_stops_training(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = tmp_path / "s.json"
    code, out, err = run(
        capsys,
        "char-rnn",
        "train",
        "--text",
        str(corpus),
        *TINY,
        "--steps",
        "100000",
        "--minutes",
        "0.003",
        "--sample-every",
        "0",
        "--out",
        str(tmp_path / "o"),
        "--json",
        str(summary),
    )
    assert code == 0, err
    s = json.loads(summary.read_text())
    assert s["stopped_by_time"] and 1 <= s["steps"] < 100000
    assert "--minutes 0.003 budget" in out
