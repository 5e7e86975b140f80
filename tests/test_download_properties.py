"""Property: however a download's connection is cut, the resumed pieces make the same file.

Each example runs a real download actor over a real store against the local file server,
which drops the connection after the drawn numbers of body bytes; every resume asks for
`Range: bytes=N-` from what is on disk.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.file_server import FileServer
from tests.support.harness import make_settings
from tests.test_downloads import download_actor, gguf

KB = 1024


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(size=st.integers(4 * KB, 400 * KB), cuts=st.lists(st.integers(1, 120 * KB), max_size=6), seed=st.integers(0, 9))
@example(size=4 * KB, cuts=[1, 2, 3], seed=1)  # cut inside the GGUF magic: the piece of it is resumed too
def test_any_split_into_dropped_connections_reassembles_the_same_bytes(size, cuts, seed):
    data = gguf(size, seed)

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as home:
            config = make_settings(Path(home) / "home")
            for mode in ("llm", "embed", "rerank"):
                config.mode_dir(mode).mkdir(parents=True)
            async with trio.open_nursery() as nursery:
                files = FileServer()
                await files.start(nursery)
                served = files.add("/model.gguf", data, drops=list(cuts))
                downloads = await download_actor(nursery, config)
                # with a sha256 (odd seeds), the digest kept while writing must survive every cut
                sha256 = hashlib.sha256(data).hexdigest() if seed % 2 else None
                with trio.fail_after(30):
                    record = await downloads.fetch(files.url("/model.gguf"), None, "llm", sha256)
                assert record.status == "completed"
                assert (config.mode_dir("llm") / "model.gguf").read_bytes() == data
                assert served.sent == len(data)  # every byte fetched exactly once
                ranges = served.ranges_asked
                assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])
                nursery.cancel_scope.cancel()

    trio.run(scenario)
