"""remove_orphan_regions (toolkit/server/stubs.py): a stopped server sweeps the python backend's shared
memory regions that no process maps, and never touches a mapped or a just-created one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bounded import read_until

from toolkit.server.stubs import REGION_PREFIX, remove_orphan_regions

HOLDER = """
import mmap, sys
with open(sys.argv[1], "r+b") as f:
    region = mmap.mmap(f.fileno(), 4096)
    print("mapped", flush=True)
    sys.stdin.readline()
"""


def test_only_old_unmapped_regions_of_the_backend_are_removed(tmp_path):
    old = time.time() - 60
    orphan, mapped, fresh = (tmp_path / f"{REGION_PREFIX}{n}" for n in ("orphan", "mapped", "fresh"))
    other = tmp_path / "not_a_region"
    for path in (orphan, mapped, fresh, other):
        path.write_bytes(b"\0" * 4096)
    for path in (orphan, mapped, other):
        os.utime(path, (old, old))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(mapped)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert read_until(holder, "\n", 30) == ["mapped\n"]
        assert remove_orphan_regions(tmp_path) == [orphan.name]
        assert not orphan.exists() and mapped.exists() and fresh.exists() and other.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert remove_orphan_regions(tmp_path) == [mapped.name]  # its holder is gone now


def test_fresh_unmapped_regions_made_since_a_gone_servers_launch_are_removed(tmp_path):
    """A server SIGTERMed while it still loads dies before removing the regions it just made."""
    launched = time.time() - 1
    fresh = tmp_path / f"{REGION_PREFIX}fresh"
    fresh.write_bytes(b"\0" * 4096)
    assert remove_orphan_regions(tmp_path, since=time.time() + 60) == []  # made before that launch
    assert remove_orphan_regions(tmp_path, since=launched) == [fresh.name]
