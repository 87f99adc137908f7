"""The versions a job records, and its check against the committed lock."""

from __future__ import annotations

from cleaner.versions import PACKAGES, lock_drift, locked_versions, package_versions


def test_the_synced_venv_matches_the_lock() -> None:
    versions = package_versions()
    assert set(PACKAGES) <= set(versions)
    assert "lock_drift" not in versions, versions.get("lock_drift")
    assert locked_versions()["torch"] == versions["torch"]


def test_drift_names_the_package_and_both_versions() -> None:
    lock = {"torch": "2.15.0", "scikit-learn": "1.9.1", "open-clip-torch": "3.3.0"}
    installed = {"torch": "2.15.0", "scikit-learn": "1.8.0", "open_clip_torch": "3.3.0"}
    assert lock_drift(installed, lock) == ["scikit-learn: installed 1.8.0, uv.lock 1.9.1"]


def test_no_lock_no_drift(tmp_path) -> None:
    assert locked_versions(tmp_path / "uv.lock") == {}
    assert lock_drift({"torch": "1.0"}, {}) == []
