"""One reader policy for every input file obim opens (weights, configs, indexes, validation data, merge configs):
regular files only (a FIFO or device would hang or never end), JSON and YAML read under a size cap, YAML aliases
counted before they are expanded, and deep nesting refused, each as a one-line error naming the file."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from .errors import ObimError

MAX_JSON_BYTES = 64 << 20  # config.json and shard indexes; a 405B model's index is a few MB
MAX_YAML_BYTES = 16 << 20  # a merge config of 10,000 models is ~1 MB
MAX_YAML_NODES = 2_000_000  # after alias expansion; a 518-byte "billion laughs" expands to ~10^9


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, what: str = "file") -> IO[bytes]:
    """Open `path` (following symlinks) for binary reading if it is a regular file. O_NONBLOCK keeps a FIFO from
    blocking the open itself; the type is checked on the opened descriptor, so a swap after a stat cannot slip
    a FIFO in."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ObimError(f"{path}: {what} not found") from None
    except OSError as e:
        raise ObimError(f"{path}: cannot open {what} ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ObimError(f"{path}: {what} is {_kind(mode)}, expected a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | Path, what: str = "file") -> None:
    """Refuse a path that is not a regular file (checked by opening it, see open_regular)."""
    open_regular(path, what).close()


def read_capped(path: str | Path, limit: int, what: str = "file") -> bytes:
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ObimError(f"{path}: {what} is larger than {limit >> 20} MiB; refusing to parse it")
    return data


def parse_json(data: bytes | str, where: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise ObimError(f"{where}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ObimError(f"{where}: invalid JSON ({e})") from None


def read_json_file(path: str | Path, what: str = "JSON file", limit: int = MAX_JSON_BYTES) -> Any:
    return parse_json(read_capped(path, limit, what), str(path))


def _expanded_nodes(root) -> int:
    """Nodes of a composed YAML graph as a loader would expand them: an alias counts its whole subtree again.
    Counted on the graph (shared nodes memoised), so a bomb is measured without being built."""
    import yaml

    def kids(node) -> list:
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [x for kv in node.value for x in kv]
        return []

    memo: dict[int, int] = {}
    busy: set[int] = set()  # on the current path: a recursive anchor counts once
    stack = [(root, False)]
    while stack:  # iterative post-order: deep nesting must not hit the recursion limit here
        node, done = stack.pop()
        if id(node) in memo:
            continue
        if done:
            busy.discard(id(node))
            memo[id(node)] = min(1 + sum(memo.get(id(k), 1) for k in kids(node)), 1 << 62)
            continue
        if id(node) in busy:
            continue
        busy.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids(node) if id(k) not in memo)
    return memo.get(id(root), 0)


def read_yaml_text(
    path: str | Path, what: str = "YAML file", limit: int = MAX_YAML_BYTES, max_nodes: int = MAX_YAML_NODES
) -> str:
    """The text of a YAML file, checked: a regular file under `limit` bytes whose alias-expanded size is at most
    `max_nodes` nodes. The caller parses the returned text (OmegaConf, yaml.safe_load)."""
    import yaml

    data = read_capped(path, limit, what)
    try:
        text = data.decode()
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ObimError(f"{path}: YAML nested too deeply") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ObimError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if root is not None:
        n = _expanded_nodes(root)
        if n > max_nodes:
            raise ObimError(
                f"{path}: YAML expands to more than {max_nodes:,} nodes through its aliases "
                f"(an alias bomb?); refusing to load it"
            )
    return text
