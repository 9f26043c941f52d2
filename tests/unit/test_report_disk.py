"""The report's disk section: OPD's peak disk use, the caches still on disk, the rollout logs."""

import json

from pipeline.report import read_manifests, _disk_section


def test_disk_section_states_peak_disk_use_kept_caches_and_rollout_counts(tmp_path):
    gib = 1024 ** 3
    (tmp_path / "opd" / "round-1" / "cache").mkdir(parents=True)
    (tmp_path / "opd" / "round-0").mkdir()
    (tmp_path / "opd" / "round-0" / "rollouts.jsonl").write_bytes(b"x" * 10_000)
    metrics = {"disk_peak_bytes": 3 * gib, "cache_bytes": [gib, gib // 2], "cache_read_amplification": [1.0, 1.05],
               "rollout_wal": {"completed": 6, "replayed": 1, "regenerated": 1, "generated": 7}}
    (tmp_path / "opd" / "manifest.json").write_text(json.dumps({"status": "done", "metrics": metrics}))
    (tmp_path / "mixed_rl").mkdir()
    (tmp_path / "mixed_rl" / "manifest.json").write_text(json.dumps(
        {"status": "done", "metrics": {"rollout_wal/completed": 24, "rollout_wal/replayed": 2,
                                       "rollout_wal/regenerated": 0}}))
    text = "\n".join(_disk_section(tmp_path, read_manifests(tmp_path)))
    assert "OPD peak disk use: 3.000 GiB" in text and "1.500 GiB written in all" in text
    assert "still on disk for rounds [1]" in text and "max 1.05 over 2 rounds" in text
    assert "| opd | 6 | 1 | 1 |" in text and "| mixed_rl | 24 | 2 | 0 |" in text
    assert "Run directory now: 0.000 GiB" in text  # 10 kB of rollouts (plus manifests)
