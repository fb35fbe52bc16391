"""hivemind, imported once, quietly and with one bound added. Modules of ours that use hivemind import this first
(``swarm``, ``expert``, ``diloco/sync.py``, ``diloco/compression.py``, ``quant/averaging.py``).

- Quietly: hivemind's MoE layers call ``torch.jit.script``, which current torch deprecates with a FutureWarning in
  every process. The filter applies to this import only; the user's warning filters stay as they are.
- Bounded: hivemind reads a message of a P2P stream whatever length it announces (``P2P.receive_raw_data``), so one
  message from a stranger could take any amount of memory before any handler of ours sees it. In our processes a
  stream message larger than ``MAX_STREAM_MESSAGE`` ends that stream instead. Our own messages are at most about
  1 MiB (``swarm/messages.py``), hivemind's averaging and state-download parts 64 KiB, DHT messages a few KiB.
  The bound is tight on purpose: protobuf spends about 85 bytes per (empty) tensor part it parses, so a 2 MiB message
  can cost ~200 MiB once parsed, and hivemind's stream handlers parse up to 5 messages ahead of the handler.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import hivemind  # noqa: F401

from hivemind.p2p.p2p_daemon import P2P  # noqa: E402

MAX_STREAM_MESSAGE = 2 << 20
"""Largest single message of a P2P stream that our processes read (bytes)."""


async def _receive_bounded(reader):  # noqa: ANN001, ANN202
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_STREAM_MESSAGE:
        raise ValueError(f"a P2P stream message announces {length} bytes; at most {MAX_STREAM_MESSAGE} are read")
    return await reader.readexactly(length)


if getattr(P2P.receive_raw_data, "__name__", "") != "_receive_bounded":
    P2P.receive_raw_data = staticmethod(_receive_bounded)


def own_locks_after_fork() -> None:
    """Give this process its own copies of hivemind's process-wide locks.

    hivemind creates a few ``multiprocessing`` locks when it is imported (``MPFuture``'s initialization and update
    locks, ``SharedBytes``' lock, ``_AsyncContextWrapper``'s executor lock). Every process forked from the importing
    one shares them, which hivemind intends for its own background processes. The embedded swarm's fork server
    (``lightning_distqat/zygote.py``) imports hivemind once and forks every expert: without this, all experts would
    share those locks, and an expert killed while it held one would block the others' DHT calls for good."""
    import multiprocessing as mp

    from hivemind.utils.asyncio import _AsyncContextWrapper
    from hivemind.utils.mpfuture import MPFuture

    MPFuture.reset_backend()
    _AsyncContextWrapper.EXECUTOR_LOCK = mp.Lock()
