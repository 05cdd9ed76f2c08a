"""Import TensorFlow without its start-up chatter on standard error."""

from __future__ import annotations

import os
import sys


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and list its devices with file descriptor 2 sent to /dev/null.

    TensorFlow 2.21 writes oneDNN, CUDA-probe and absl start-up lines straight to
    file descriptor 2 from C++, ignoring TF_CPP_MIN_LOG_LEVEL, and they would
    bury the one-line error or progress output of the command line. Python
    exceptions raised by the import still reach the caller after stderr is back.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.config.list_physical_devices()
        _ = tf.constant(0.0) + 1.0
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
