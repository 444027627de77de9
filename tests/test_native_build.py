"""A built kernel loads whatever lock file a killed process left beside it, and a build lock older
than any build is cleared instead of waited on forever."""

import os
import threading
import time

from tunelab import native_build
from tunelab.models.cache import cache_root
from tunelab.train import block_kernels as bk


def test_a_built_kernel_loads_past_a_lock_a_killed_process_left():
    name = native_build.build_name("tunelab_block", bk._SOURCE, native_build.FLAGS)
    assert bk.block_kernels() is not None  # built (setup.sh builds it; else now)
    lock = cache_root() / "kernels" / name / "lock"
    lock.touch()  # what a process SIGKILLed inside torch's load_inline leaves (torch waits on it with no limit)
    loaded = []
    try:
        worker = threading.Thread(target=lambda: loaded.append(native_build.build_extension("tunelab_block", bk._SOURCE, bk._FUNCTIONS, "test", "test")),
                                  daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert loaded and loaded[0] is not None, "the built kernel waited on the lock"
        assert loaded[0].silu_mul is not None
    finally:
        lock.unlink(missing_ok=True)


def test_only_a_lock_older_than_any_build_is_cleared(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    assert not native_build.clear_stale_lock(tmp_path) and lock.exists()  # a build may be running
    old = time.time() - native_build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    assert native_build.clear_stale_lock(tmp_path) and not lock.exists()
    assert not native_build.clear_stale_lock(tmp_path)  # none there
