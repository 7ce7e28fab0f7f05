"""offload="nvme": every layer's bytes (or this process's share) in a file of its own, read back with
O_DIRECT by a pool of threads.

Why O_DIRECT through os.preadv in threads rather than an async-I/O library: the reads bypass the page cache
(a model larger than RAM would otherwise evict everything and count twice), preadv releases the GIL so N
threads keep N 16 MB requests in flight, which is what an NVMe drive needs to reach its bandwidth, and the
Python bindings of libaio / io_uring are unmaintained or need a compiler. On file systems without O_DIRECT
(tmpfs) the store reads through the page cache and drops the pages after each read.

Files are written once at load time through a shared memory map (the weights arrive in checkpoint order,
not layer by layer), then flushed and dropped from the page cache before the first read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from scaleinfer.errors import ModelLoadError, OffloadReadError
from scaleinfer.offload.buffers import aligned_empty
from scaleinfer.offload.layout import IO_ALIGN, LayerLayout
from scaleinfer.offload.shard import Shard
from scaleinfer.offload.store import LayerStore

BLOCK_BYTES = 16 << 20  # one read request; large enough to stream, small enough to spread over readers


class NVMeStore(LayerStore):
    def __init__(self, layouts: list[LayerLayout], path: str, num_readers: int, shard: Shard | None = None) -> None:
        super().__init__(layouts, shard)
        kept = sum(self.share(i)[1] for i in range(len(layouts)))
        self.folder = _make_folder(path, kept)
        weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.files = [self.folder / f"layer-{i:04d}.bin" for i in range(len(layouts))]
        for index, file in enumerate(self.files):
            _allocate(file, self.share(index)[1], path)
        self.pool = ThreadPoolExecutor(num_readers, thread_name_prefix="scaleinfer-nvme")
        self._maps: dict[int, torch.Tensor] = {}
        self._fds: list[int] = []

    def finish_loading(self) -> None:
        """Keep the loaded shares, unmap, flush to disk, drop the cached pages, open every file for direct
        reads."""
        super().finish_loading()
        self._maps.clear()
        for file in self.files:
            _flush_and_drop(file)
        self.direct_io = _direct_io_works(self.files[0])
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
        self._fds = [os.open(file, flags) for file in self.files]

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Read this process's share of layer `index` to its offset in dst ([>= nbytes] uint8, IO_ALIGN-aligned
        host memory); blocks until done. Raises OffloadReadError naming the file and offset when the disk
        returns less or fails."""
        start, nbytes = self.share(index)
        offsets = range(0, nbytes, BLOCK_BYTES)
        reads = [self.pool.submit(self._read_block, index, dst[start:], off, min(BLOCK_BYTES, nbytes - off))
                 for off in offsets]
        for read in reads:
            read.result()

    def _read_block(self, index: int, dst: torch.Tensor, offset: int, size: int) -> None:
        target = (ctypes.c_char * size).from_address(dst.data_ptr() + offset)
        try:
            got = os.preadv(self._fds[index], [memoryview(target)], offset)
        except OSError as exc:
            raise OffloadReadError(f"reading layer {index} from {self.files[index]} at byte {offset}: {exc}") from exc
        if got != size:
            raise OffloadReadError(f"reading layer {index} from {self.files[index]} at byte {offset}: got {got} of "
                                   f"{size} bytes (the file was truncated or replaced)")
        if not self.direct_io:
            os.posix_fadvise(self._fds[index], offset, size, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        shutil.rmtree(self.folder, ignore_errors=True)

    def _kept(self, index: int) -> torch.Tensor:
        """[share size] uint8 mapped onto layer `index`'s file; valid until finish_loading."""
        if index not in self._maps:
            size = self.share(index)[1]
            self._maps[index] = torch.from_file(str(self.files[index]), shared=True, size=size, dtype=torch.uint8)
        return self._maps[index]


def _make_folder(path: str, nbytes: int) -> Path:
    """A fresh subfolder of `path` for this run's files; errors name the path and what is wrong with it."""
    parent = Path(path).expanduser()
    if not parent.is_dir():
        raise ModelLoadError(f"offload_path {parent} does not exist or is not a folder")
    try:
        folder = Path(tempfile.mkdtemp(prefix="scaleinfer-offload-", dir=parent))
    except OSError as exc:
        raise ModelLoadError(f"offload_path {parent} is not writable: {exc.strerror}") from exc
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        shutil.rmtree(folder, ignore_errors=True)
        raise ModelLoadError(f"offload_path {parent} has {free / 2**30:.2f} GiB free; the streamed layers need "
                             f"{nbytes / 2**30:.2f} GiB")
    return folder


def _allocate(file: Path, nbytes: int, path: str) -> None:
    """Reserve the file's blocks now, so a full disk fails here with ENOSPC, not later inside a mapped write."""
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        reason = "is out of space" if exc.errno == errno.ENOSPC else f"failed: {exc}"
        raise ModelLoadError(f"offload_path {path}: reserving {nbytes} bytes for {file.name} {reason}") from exc
    finally:
        os.close(fd)


def _flush_and_drop(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_io_works(file: Path) -> bool:
    """Whether the file system takes O_DIRECT reads (tmpfs, for one, refuses them)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    probe = aligned_empty(IO_ALIGN)
    try:
        target = (ctypes.c_char * IO_ALIGN).from_address(probe.data_ptr())
        return os.preadv(fd, [memoryview(target)], 0) == IO_ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
