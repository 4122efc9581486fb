"""`paged-generate demo`: run in-process on the embedded model with small parameters."""

from __future__ import annotations

import json
import sys

import pytest

from paged_generate.cli import main
from paged_generate.demo import DEFAULT_MODEL_DIR

SMALL = ["demo", "--quick", "--width", "3", "--new-tokens", "6", "--prompts", "2", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def restore_process_settings():
    """main() sets torch's thread count and turns transformers' progress bars off, as a command may; undo both."""
    import torch
    from transformers.utils import logging as transformers_logging

    threads, bars = torch.get_num_threads(), transformers_logging.is_progress_bar_enabled()
    yield
    torch.set_num_threads(threads)
    if bars:
        transformers_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def json_report():
    """One --json run shared by the tests that read its figures."""
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(SMALL + ["--json"])
    return code, json.loads(buffer.getvalue())


def test_embedded_model_is_shipped():
    names = {path.name for path in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "TRAINING.md"} <= names
    size = sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir())
    assert size < 10 * 2**20


def test_demo_prints_side_by_side_table(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    assert "KV cache at peak, MiB" in out and "RSS growth in generate" in out
    assert "beam search, 3 beams x 2 prompts" in out and "sampling, 3 samples x 2 prompts" in out
    table = [line for line in out.splitlines() if line.startswith(("beam search", "sampling"))]
    assert len(table) == 2 and all(line.rstrip().endswith("yes") for line in table)
    assert out.count("paged: (same)") == 4  # 2 modes x 2 prompts, identical text
    assert "generated from here" in out


def test_demo_json_parses_and_texts_are_identical(json_report):
    code, report = json_report
    assert code == 0 and report["identical"] is True
    assert [r["mode"] for r in report["results"]] == ["beam", "sample"]
    for result in report["results"]:
        stock, paged = result["stock"], result["paged"]
        assert result["identical"] and stock["texts"] == paged["texts"]
        assert len(stock["texts"]) == (2 if result["mode"] == "beam" else 2 * 3)
        assert len(stock["kv_trace"]) == len(paged["kv_trace"]) == 6  # one entry per forward
        stats = paged["stats"]
        assert stats["rows"] == 2 * 3 and stats["prefill_rows"] == 2
        # The stock cache measured in the stock run is what the plugin says the stock cache holds.
        assert stock["kv_peak_bytes"] == stats["dense_kv_bytes"]
        assert paged["kv_peak_bytes"] == stats["peak_kv_bytes"] < stock["kv_peak_bytes"]
        assert 0 < stats["saving"] < 1


def test_embedded_model_writes_python(json_report):
    _, report = json_report
    beam = report["results"][0]["paged"]["texts"]
    # The first prompt ends inside a `for line in f:` loop, the second with `def pop(self):`.
    assert any(word in beam[1] for word in ("self", "return", "items"))


@pytest.mark.parametrize("argv", [
    [],
    ["nonsense"],
    ["demo", "--width", "0"],
    ["demo", "--new-tokens", "many"],
    ["demo", "--modes", "greedy"],
    ["demo", "--block-size", "3"],
    ["demo", "--dtype", "int8"],
    ["demo", "--unknown-flag"],
])
def test_bad_arguments_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: paged-generate" in capsys.readouterr().err


def test_unsupported_model_is_refused_without_traceback(tmp_path, capsys):
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["demo", "--model", str(tmp_path), "--quick", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("paged-generate: error:") and "BloomForCausalLM" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_missing_model_exits_2(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "could not load" in capsys.readouterr().err


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    target = tmp_path / "kv.png"
    assert main(SMALL + ["--modes", "beam", "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"KV figure written to {target}" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(SMALL + ["--plot", str(tmp_path / "kv.png")]) == 1
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and not (tmp_path / "kv.png").exists()


def test_demo_with_compressed_blocks_reports_the_share_of_equal_tokens():
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(SMALL + ["--kv-cache-dtype", "int8", "--modes", "beam", "--json"])
    report = json.loads(buffer.getvalue())
    assert code == 0 and report["kv_cache_dtype"] == "int8"
    (result,) = report["results"]
    assert result["paged"]["stats"]["kv_cache_dtype"] == "int8" and 0.0 <= result["same_token_share"] <= 1.0
    # fp32 blocks of 16 tokens -> 1 byte per element plus scales: well under half of what the same call holds as fp32.
    stats = result["paged"]["stats"]
    assert stats["peak_kv_bytes"] < 0.5 * stats["dense_kv_bytes"]


def test_unknown_kv_cache_dtype_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--kv-cache-dtype", "int4"])
    assert exit_info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
