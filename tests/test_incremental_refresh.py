"""The incremental-refresh benchmark runs end to end on a tiny catalog and writes its block."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_incremental_refresh_benchmark_writes_its_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- incremental-refresh:start -->\n<!-- incremental-refresh:end -->\n")
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "incremental_refresh.py"), "--catalog", "builtin:families=2,siblings=2,listings=2,lines=mugs+tops",
         "--workdir", str(tmp_path / "work"), "--write-results", str(readme)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = readme.read_text()
    assert "| tops (new) | 8 |" in text and "| mugs | 8 |" in text
    assert "(1 shard built, 1 reused) | 16 |" in text  # the new line's shard is built, the unchanged line's found in the store
    assert "n/N = 0.50" in text and "ratio **" in text and "with unchanged inputs" in text
