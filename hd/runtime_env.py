"""Environment defaults for a quiet start-up, applied once when the `hd` package is first imported.

They must be in place before JAX starts its backends and before TensorFlow (clu's summary writer) is imported;
`hd/__init__.py` calls `apply_defaults()`, so every entry point (`python -m hd.main`, `hd.pipeline`, ...) gets
them first. Only defaults are set (`os.environ.setdefault`): a variable the user exported always wins.
Cheap on purpose (no JAX or TensorFlow import): `hd` is imported by every command, `--help` included.
"""

from __future__ import annotations

import glob
import os

# JAX's own test for an attached TPU (jax/_src/hardware_utils.py): a PCI device of Google's vendor id.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_attached(root: str = "/") -> bool:
    """True when the host shows any sign of a TPU: /dev/accel* (TPU VMs up to v4), /dev/vfio/* (v5e and
    later) or a Google PCI device. Errs towards True: a false True only leaves libtpu's start-up messages in.
    `root` is the file-system root to look under (tests)."""
    under = lambda pattern: glob.glob(os.path.join(root, pattern))
    if under("dev/accel*") or under("dev/vfio/*"):
        return True
    for vendor_file in under("sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def apply_defaults() -> None:
    """libtpu is installed for `hd.compile_check` (requirements.txt). With it, JAX tries its TPU backend at the
    first device query on every machine; without a TPU, libtpu then prints "Failed to find host bounds for
    accelerator type ..." and "unexpected worker hostname ..." to stderr before JAX falls back to the CPU (or
    GPU): errors a user can do nothing about. Giving libtpu an accelerator type and a worker list silences them,
    and it still finds no chip and declines quietly.

    Why not JAX_PLATFORMS=cpu: it would hide a GPU host's GPUs too, and the TPUs of a TPU VM we failed to
    recognise. The variables set here would mislead libtpu on a real TPU (a pod worker needs its real worker
    list), so they are set only when the host shows no sign of one, and `tpu_attached` errs towards seeing
    one; on a TPU VM nothing is touched and libtpu reads the real topology. `hd.compile_check` still works: it sets its own TPU variables only where none are set, and asks
    libtpu for a topology by name, whatever TPU_ACCELERATOR_TYPE says.
    """
    if not tpu_attached():
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata-server query off Google Cloud
    # TensorFlow is imported only by clu's TensorBoard writer (and tfds), never for hd's math. At import it logs
    # "oneDNN custom operations are on ..." twice (TF 2.21 prints it whatever TF_CPP_MIN_LOG_LEVEL says, unless
    # its oneDNN ops are off; they only speed up TF's own CPU kernels, which hd does not run) and CPU-feature
    # INFO lines; keep its warnings and errors.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
