"""bench.py runs end to end on a tiny shape (no timing is asserted: speed goals live in the README)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_generate_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "generate", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                        "--new_tokens", "8", "--repeats", "1", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())["generate"]
    assert set(result["tokens_per_sec"]) == {"ours (KV cache)", "ours (recompute context)", "HF generate (cache)"}
    assert all(v > 0 for v in result["tokens_per_sec"].values()) and set(result["ratios"]) == {"cache_vs_recompute", "ours_vs_hf"}
