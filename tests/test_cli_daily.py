"""Day-to-day CLI behaviour: an unexpected error is not a gate failure, --threads, plain progress in logs."""

from __future__ import annotations

import pytest


def test_unexpected_error_has_its_own_exit_code_and_one_line(run_main, monkeypatch, tmp_path) -> None:
    import fairdeploy.cli.prune as prune_cli

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(prune_cli, "read_manifest", boom)
    code, _out, err = run_main("prune", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                               str(tmp_path / "o"), "--criterion", "magnitude", "--target-macs", "0.5")
    assert code == 4  # not 1: that code means "a validation gate failed" to CI
    assert "internal error (RuntimeError: boom)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2
    monkeypatch.setenv("FAIRDEPLOY_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="boom"):
        run_main("prune", "--model", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out",
                 str(tmp_path / "o"), "--criterion", "magnitude", "--target-macs", "0.5")


def test_threads_option_sets_torch_threads(run_main, tmp_path) -> None:
    import torch

    before = torch.get_num_threads()
    target = 3 if before != 3 else 2
    try:
        code, _out, err = run_main("--threads", str(target), "prune", "--model", str(tmp_path), "--data",
                                   str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--criterion", "bogus",
                                   "--target-macs", "0.5")
        assert code == 2 and "unknown criterion" in err
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)


def test_progress_prints_one_plain_line_per_finished_task_off_a_terminal(capsys) -> None:
    from fairdeploy.cli.common import RichProgress

    with RichProgress() as progress:
        for i in range(1, 4):
            progress("train epoch 1/2", i, 3)
        progress("train epoch 2/2", 1, 3)  # unfinished: no line
    cap = capsys.readouterr()
    assert cap.err == ""  # stderr stays for errors
    lines = [ln for ln in cap.out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].endswith("train epoch 1/2: 3/3") and " s] " in lines[0]
