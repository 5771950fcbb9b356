"""release_file_pages: which mappings it unmaps, and that a process still runs after it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from edge.profiling.memory import _unwritten_file_mappings

_SMAPS = """\
7f0000000000-7f0000010000 r-xp 00000000 08:01 111 /usr/lib/libcode.so
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000010000-7f0000020000 r--p 00010000 08:01 111 /usr/lib/libcode.so
Rss:                  16 kB
Anonymous:             4 kB
Locked:                0 kB
7f0000020000-7f0000030000 rw-p 00020000 08:01 111 /usr/lib/libcode.so
Rss:                  32 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000030000-7f0000040000 r--p 00000000 08:01 222 /tmp/shard.onnx.data (deleted)
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000040000-7f0000050000 r--p 00000000 00:05 333 /dev/dri/card0
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000050000-7f0000060000 r--s 00000000 08:01 444 /usr/lib/shared.bin
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000060000-7f0000070000 r--p 00000000 00:00 0 
Rss:                  64 kB
Anonymous:            64 kB
Locked:                0 kB
7f0000070000-7f0000080000 r-xp 00000000 08:01 555 /usr/lib/liblocked.so
Rss:                  64 kB
Anonymous:             0 kB
Locked:               64 kB
7f0000080000-7f0000090000 r--p 00000000 08:01 666 /usr/lib/libcold.so
Rss:                   0 kB
Anonymous:             0 kB
Locked:                0 kB
7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   4 kB
Anonymous:             0 kB
Locked:                0 kB
"""


def test_only_clean_read_only_file_mappings(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text(_SMAPS)
    # Not: a mapping with a copied-on-write page, a writable one, a deleted file, a device,
    # a shared one, an anonymous one, a locked one, one with nothing resident, the vdso.
    assert _unwritten_file_mappings(str(smaps)) == [(0x7f0000000000, 0x7f0000010000, 64)]


_CHILD = textwrap.dedent("""
    import json
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from edge.profiling.memory import memory_breakdown, release_file_pages

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = memory_breakdown()["rss_file"]
    dropped = release_file_pages()
    after = memory_breakdown()["rss_file"]
    a = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], dtype=np.float32)
    got = sess.run(None, {"x": a})[0]
    print(json.dumps(dict(before=before, after=after, dropped=dropped,
                          ok=bool(np.array_equal(got, np.maximum(a, 0))))))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_process_runs_on_after_release():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ok"]
    assert r["dropped"] > 1 << 20
    assert r["after"] < r["before"]
