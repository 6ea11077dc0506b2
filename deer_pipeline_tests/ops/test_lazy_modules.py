"""The stand-ins the Dagster layer uses for library modules (``deer_pipeline.lazy_modules``)."""

import subprocess
import sys
import textwrap

from deer_pipeline.lazy_modules import LazyModule, lazy


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_an_imported_module_is_returned_itself():
    import json

    assert lazy("json") is json


def test_the_module_loads_on_first_use_and_writes_reach_it():
    # a fresh process, so that the module is not imported yet
    out = _run("""
        import sys
        from deer_pipeline.lazy_modules import lazy
        m = lazy("deer_pipeline.identity.flanks")
        before = "deer_pipeline.identity.flanks" in sys.modules
        code = m.SIDE_CODE                      # first read: imports the real module
        import deer_pipeline.identity.flanks as real
        same = code is real.SIDE_CODE
        m.SIDE_CODE = {"patched": 1}            # a write through the stand-in reaches the module
        print(before, same, real.SIDE_CODE == {"patched": 1}, sys.modules["deer_pipeline.identity.flanks"] is real)
    """)
    assert out == "False True True True"


def test_concurrent_first_reads_see_the_whole_module():
    out = _run("""
        import threading
        from deer_pipeline.lazy_modules import lazy
        m = lazy("deer_pipeline.identity.gallery")
        seen, start = [], threading.Barrier(8)
        def read():
            start.wait()
            seen.append(m.Gallery.__name__)
        threads = [threading.Thread(target=read) for _ in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(seen.count("Gallery"))
    """)
    assert out == "8"


def test_a_missing_module_fails_when_used():
    m = lazy("deer_pipeline.no_such_module")
    assert isinstance(m, LazyModule)
    try:
        m.anything
    except ModuleNotFoundError as exc:
        assert "deer_pipeline.no_such_module" in str(exc)
    else:
        raise AssertionError("a missing module must fail loudly when used")
