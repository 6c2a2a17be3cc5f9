"""Start-up environment defaults (hd/runtime_env.py): libtpu's errors on machines without TPUs are silenced
without touching a TPU host, and user-set variables always win."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO

from hd import runtime_env

TPU_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY")
LIBTPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname", "could not determine TPU")
TF_NOISE = "oneDNN custom operations are on"  # TensorFlow (clu's summary writer) at import


def _write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_tpu_attached_reads_device_files_and_pci_vendors(tmp_path):
    assert not runtime_env.tpu_attached(str(tmp_path))
    _write(tmp_path / "sys/bus/pci/devices/0000:00:04.0/vendor", "0x8086\n")  # not Google
    assert not runtime_env.tpu_attached(str(tmp_path))
    google_pci = ("sys/bus/pci/devices/0000:00:05.0/vendor", "0x1ae0\n")
    for marker, text in (("dev/accel0", ""), ("dev/vfio/0", ""), google_pci):
        root = tmp_path / marker.replace("/", "_")
        _write(root / marker, text)
        assert runtime_env.tpu_attached(str(root)), marker


@pytest.mark.parametrize("attached", [False, True])
def test_tpu_defaults_only_without_a_tpu_and_never_over_user_values(monkeypatch, attached):
    for name in TPU_VARS + ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1")  # the user's
    monkeypatch.setattr(runtime_env, "tpu_attached", lambda: attached)
    runtime_env.apply_defaults()
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "w-0,w-1"
    if attached:  # a TPU VM: libtpu reads the real topology
        assert "TPU_ACCELERATOR_TYPE" not in os.environ and "TPU_SKIP_MDS_QUERY" not in os.environ
    else:
        assert os.environ["TPU_ACCELERATOR_TYPE"] == "v4-8" and os.environ["TPU_SKIP_MDS_QUERY"] == "1"
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0" and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed: nothing to quiet")
@pytest.mark.skipif(runtime_env.tpu_attached(), reason="this host has a TPU: libtpu is meant to start")
def test_first_device_query_prints_no_libtpu_errors_after_importing_hd():
    # This pytest process imported hd already: drop what it set, so both children start from a bare environment.
    dropped = TPU_VARS + ("JAX_PLATFORMS", "XLA_FLAGS", "TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # another JAX process may hold libtpu's lock

    def stderr_of(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "cpu" in proc.stdout.lower(), proc.stdout
        return proc.stderr

    # Without hd, JAX's TPU attempt makes libtpu complain and TensorFlow announces oneDNN (so the checks below
    # can fail)...
    noisy = stderr_of("import jax, tensorflow; print(jax.devices())")
    assert any(words in noisy for words in LIBTPU_NOISE) and TF_NOISE in noisy, noisy
    # ...with hd imported first, neither.
    quiet = stderr_of("import hd, jax, tensorflow; print(jax.devices())")
    assert not any(words in quiet for words in LIBTPU_NOISE) and TF_NOISE not in quiet, quiet
