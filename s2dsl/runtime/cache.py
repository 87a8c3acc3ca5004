"""Generated kernel modules, cached in process and on disk.

Each entry is the generated Python source of one (pattern, kernel kind, specialisation).
On disk it is written atomically (a temporary file renamed into place), so processes
filling one cache at once never see half a file; the first line holds a checksum of the
rest, so a corrupted entry is detected and regenerated. Triton keeps its own cache of the
compiled binaries; this one saves the generation and keeps the source readable.

A directory that cannot be used (read-only, a file in its place, an entry that is a
directory) costs one ``CacheWarning``; the cache then keeps generated modules in memory
only, registering their source with ``linecache`` so that Triton still reads it. Temporary
files left by a writer that died mid-write are removed once they are old.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import linecache
import os
import tempfile
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Optional

CHECKSUM_PREFIX = "# s2dsl-checksum: "
#: temporary files older than this are from a writer that died, not one still writing
STALE_TMP_SECONDS = 3600


class CacheWarning(UserWarning):
    """The kernel cache directory is unusable; modules are kept in memory instead."""


def default_cache_dir() -> Path:
    if os.environ.get("S2DSL_CACHE_DIR"):
        return Path(os.environ["S2DSL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s2dsl"


@dataclass
class CacheStats:
    generated: int = 0     # sources produced by codegen
    disk_hits: int = 0     # sources read back from disk
    memory_hits: int = 0   # modules found already imported in this process
    corrupted: int = 0     # disk entries whose checksum failed (then regenerated)
    memory_only: int = 0   # modules generated without the disk (the directory was unusable)


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class KernelCache:
    directory: Optional[Path] = None
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self._modules: Dict[str, ModuleType] = {}
        self._lock = threading.Lock()
        self._disk_problem: Optional[str] = None  # set once the directory failed: memory only from then on
        self._cleaned = False

    @property
    def path(self) -> Path:
        return Path(self.directory) if self.directory is not None else default_cache_dir()

    def entry(self, key: str) -> Path:
        return self.path / f"{key}.py"

    def get(self, key: str, generate: Callable[[], str]) -> ModuleType:
        """The module for ``key``, from memory, disk, or ``generate()`` in that order."""
        with self._lock:
            module = self._modules.get(key)
            if module is not None:
                self.stats.memory_hits += 1
                return module
            module = None
            if self._disk_problem is None:
                try:
                    module = self._from_disk(key, generate)
                except OSError as exc:
                    self._disk_problem = f"{self.path}: {exc.strerror or exc}"
                    warnings.warn(f"s2dsl kernel cache directory is unusable ({self._disk_problem}); keeping "
                                  "generated kernels in memory for this process (set S2DSL_CACHE_DIR to a "
                                  "writable directory to keep them)", CacheWarning, stacklevel=3)
            if module is None:
                module = _import_source(key, generate())
                self.stats.generated += 1
                self.stats.memory_only += 1
            self._modules[key] = module
            return module

    def _from_disk(self, key: str, generate: Callable[[], str]) -> ModuleType:
        if not self._cleaned:
            self._cleaned = True
            self._clean_stale()
        path = self.entry(key)
        if not self._valid(path):
            self._write(path, generate())
            self.stats.generated += 1
        else:
            self.stats.disk_hits += 1
        return self._import(key, path)

    def _clean_stale(self) -> None:
        """Remove temporary files of writers that died; best effort, never an error."""
        try:
            old = time.time() - STALE_TMP_SECONDS
            for tmp in self.path.glob("*.tmp"):
                try:
                    if tmp.is_file() and tmp.stat().st_mtime < old:
                        tmp.unlink()
                except OSError:
                    pass
        except OSError:
            pass

    def clear_memory(self):
        with self._lock:
            self._modules.clear()

    def _valid(self, path: Path) -> bool:
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return False  # an entry that cannot be read otherwise (a directory, no permission) is an OSError
        first, _, body = text.partition("\n")
        if first.startswith(CHECKSUM_PREFIX) and first[len(CHECKSUM_PREFIX):] == _checksum(body):
            return True
        self.stats.corrupted += 1
        return False

    def _write(self, path: Path, source: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"{CHECKSUM_PREFIX}{_checksum(source)}\n{source}"
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @staticmethod
    def _import(key: str, path: Path) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"s2dsl_generated_{key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _import_source(key: str, source: str) -> ModuleType:
    """A module from source kept in memory. Triton reads kernels' source through ``inspect``,
    which finds it in ``linecache`` under the module's pseudo file name."""
    filename = f"<s2dsl-generated {key}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # mtime None: kept
    module = types.ModuleType(f"s2dsl_generated_{key}")
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


_default: Optional[KernelCache] = None


def default_cache() -> KernelCache:
    global _default
    if _default is None:
        _default = KernelCache()
    return _default


@functools.lru_cache(maxsize=1)
def codegen_fingerprint() -> str:
    """Hash of the code generator's own source: a changed generator never reuses old entries."""
    folder = Path(__file__).resolve().parent.parent / "codegen"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]
