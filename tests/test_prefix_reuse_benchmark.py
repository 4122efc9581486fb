"""benchmarks/prefix_reuse.py runs end to end on tiny shapes, checks tokens against stock, and writes its JSON."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_prefix_reuse_smoke_run(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("prefix_reuse", None)
    import prefix_reuse

    out = tmp_path / "prefix_reuse.json"
    assert prefix_reuse.main(["--context", "40", "--questions", "3", "--question-len", "5", "--new-tokens", "3",
                              "--fewshot", "36", "--fewshot-questions", "4", "--batch", "2", "--repeats", "1",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["document"]["prefix_hit_tokens"] == [0, 32, 32]  # 40-token document: 2 blocks of 16 after the first
    assert result["fewshot_batches"]["prefix_hit_tokens"] == [0, 2 * 32]
    memory = result["memory"]
    assert memory["two private pools"]["bytes_held"] == memory["one shared pool"]["bytes_held"] > 0
    budgeted = memory["one shared pool, budget"]
    assert budgeted["peak_storage_bytes"] <= budgeted["max_cache_bytes"]
    assert "| paged, KVPool |" in capsys.readouterr().out
