"""How a trainer and its machine's data server talk: JSON messages (never pickle) over a Unix socket in a private
directory of the user, accepted only from processes of the same user.

- :func:`private_dir`: ``$XDG_RUNTIME_DIR/distqat`` when that directory is the user's and only the user writes
  there, else ``<tmp>/distqat-<uid>``; mode 0700,
  owned by the user, or an error that says what is wrong (another user could otherwise plant a socket there first).
- :func:`send` / :func:`recv`: one JSON value per message, length-prefixed, at most ``MAX_MESSAGE`` bytes.
- :func:`peer_uid`: the user of the process at the other end (``SO_PEERCRED``).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import tempfile
from typing import Any

__all__ = ["MAX_MESSAGE", "private_dir", "send", "recv", "peer_uid", "WireError"]

MAX_MESSAGE = 1 << 20
_HEADER = struct.Struct(">I")


class WireError(ValueError):
    """A message that does not follow the format (too large, not JSON, not a list)."""


def private_dir() -> str:
    """This user's private directory for sockets (made if missing). Raises ``PermissionError`` naming the path if it
    belongs to someone else or others may enter it."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    info = os.stat(runtime) if runtime and os.path.isdir(runtime) else None
    if info is not None and info.st_uid == os.getuid() and not info.st_mode & 0o022:  # ours, and only we write there
        path = os.path.join(runtime, "distqat")
    else:
        path = os.path.join(tempfile.gettempdir(), f"distqat-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of user {os.getuid()} that only they may enter (mode "
                              f"0700); it is owned by user {info.st_uid} with mode {oct(info.st_mode & 0o777)}. Remove "
                              "it, or set XDG_RUNTIME_DIR to a private directory")
    return path


def send(sock: socket.socket, message: Any) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"a message of {len(data)} bytes is larger than {MAX_MESSAGE}")
    sock.sendall(_HEADER.pack(len(data)) + data)


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> list:
    """The next message (a JSON list). ``EOFError`` when the other side closed; :class:`WireError` for a message that
    does not follow the format (nothing larger than ``MAX_MESSAGE`` is read)."""
    (size,) = _HEADER.unpack(_exactly(sock, _HEADER.size))
    if size > MAX_MESSAGE:
        raise WireError(f"a message announces {size} bytes; at most {MAX_MESSAGE} are accepted")
    try:
        message = json.loads(_exactly(sock, size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"a message is not JSON ({e})") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise WireError("a message must be a list that starts with its kind")
    return message


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process connected at the other end of a Unix socket."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid
