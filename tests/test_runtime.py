"""Allocator tuning: opt-out and user settings (the page faults it saves are measured by
``python -m benchmarks.checks``, not asserted here: they depend on the machine's load)."""



from recon_plugin.runtime import tune_allocator


def test_allocator_tuning_respects_opt_out_and_user_settings(monkeypatch):
    monkeypatch.setenv("RECON_PLUGIN_TUNE_MALLOC", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("RECON_PLUGIN_TUNE_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert tune_allocator() is False
