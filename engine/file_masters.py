"""Host masters read from file: where a streamed unit's bytes are on disk, and the spill file for the
bytes that are not.

Pure torch + the standard library; no ComfyUI. A unit kept "from file" has no copy in RAM: between uses
its parameters are views of a read-only memory map of a file, and each time it streams its bytes are
read from that file into a pinned staging buffer (:mod:`staging`) and copied from there into its slot.
Reading uses the file, not the mapping: ``readinto`` is several times faster than copying through
page faults, and nothing the mapping would pull in stays resident.

Where the bytes of one tensor come from (:func:`file_slice`), first match wins:

1. **A slice the pack recorded** when it mapped the file itself (its loaders, its spill files): the
   storage carries ``_wan22bs_file = (FileHandle, file offset of the storage's first byte)``.
2. **A read-only or unmodified file mapping** (Linux: ``/proc/self/maps`` and ``smaps``): ComfyUI's
   loaders (comfy-aimdo's map with ``_comfy_tensor_file_slice``, safetensors' ``safe_open``),
   gguf-py's ``numpy.memmap`` (ComfyUI-GGUF). The mapped file must still be the one on disk (device
   and inode), and a private writable mapping must hold no page of its own (``Anonymous: 0 kB``).
3. **ComfyUI's ``_comfy_tensor_file_slice``** where (2) cannot look (Windows): the tensor itself views
   the file's mapping, so the unit is read by copying from that view (:class:`MappedSource`).
4. Otherwise (weights converted at load, a dtype change, the fp8 option, quantized weights built in
   memory) the bytes are written once to a **spill file** (:class:`SpillFile`) and read from there.

Only contiguous tensors count as slices: a unit's bytes are laid out in its slot as contiguous
tensors (:mod:`host_masters`), so a permuted tensor is spilled in that layout.
"""
from __future__ import annotations

import mmap
import os
import re
import threading
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..config import BlockSwapError, tensor_bytes
from ..utils import format_bytes, get_logger

log = get_logger("engine")

TAG = "_wan22bs_file"  # storage attribute: (FileHandle, file offset of the storage's first byte)
SPILL_PREFIX = "wan22bs-spill-"  # spill file names: wan22bs-spill-<pid>-<hex>.bin
_SPILL_NAME = re.compile(r"^wan22bs-spill-(\d+)-[0-9a-f]{8,32}\.bin$")
_GRANULE = mmap.ALLOCATIONGRANULARITY  # a mapping starts at a multiple of it (4 KiB Linux, 64 KiB Windows)
REGION_PAD = 1 << 16  # the most a spill region's start at a granule can pad it by (any OS)


class FileReadError(BlockSwapError):
    """A unit's bytes could not be read from its file (changed, truncated, deleted, an I/O error)."""


class SpillError(BlockSwapError):
    """The spill folder cannot take a unit's bytes (not writable, full)."""


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


class FileHandle:
    """An open file units are read from: a weight file or a spill file.

    ``identity`` (device, inode, size, mtime) is taken when the file is opened; :meth:`problem` says
    whether the file on disk is still that file, so a model file changed, truncated or deleted
    between runs is an error before a forward reads it. Reads at an offset use ``os.preadv`` where
    the OS has it and ``seek`` + ``readinto`` under a lock elsewhere (Windows)."""

    def __init__(self, path: str, fileobj=None, spill: bool = False):
        self.path = os.fspath(path)
        self.spill = spill
        self._f = fileobj if fileobj is not None else open(self.path, "rb", buffering=0)
        st = os.fstat(self._f.fileno())
        self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._f.close)

    @property
    def size(self) -> int:
        return self.identity[2]

    def problem(self) -> Optional[str]:
        """None while the file on disk is the one opened; else what happened to it. Spill files are
        the pack's own (and may have no name left): never checked."""
        if self.spill:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return "it was deleted or moved"
        dev, ino, size, mtime = self.identity
        if (st.st_dev, st.st_ino) != (dev, ino):
            return "it was replaced by another file"
        if st.st_size != size:
            return f"its size changed from {size} to {st.st_size} bytes"
        if st.st_mtime_ns != mtime:
            return "it was modified"
        return None

    def read_into(self, dst: torch.Tensor, offset: int) -> None:
        """Fill ``dst`` (a contiguous CPU uint8 tensor) with the file's bytes from ``offset``."""
        view = memoryview(dst.numpy()).cast("B")
        done, n = 0, len(view)
        while done < n:
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(self._f.fileno(), [view[done:]], offset + done)
                else:  # pragma: no cover - Windows
                    with self._lock:
                        self._f.seek(offset + done)
                        got = self._f.readinto(view[done:])
            except OSError as e:
                raise FileReadError(f"{self.path}: reading {n} bytes at offset {offset} failed ({e}); "
                                    "block swap cannot stream from it. Check the disk, or set host_memory "
                                    "to RAM.") from e
            if not got:
                raise FileReadError(f"{self.path}: the file ended at byte {offset + done} while block swap read "
                                    f"bytes {offset}..{offset + n}; it was truncated or changed. Load the "
                                    "model again.")
            done += got

    def close(self) -> None:
        self._finalizer()


# ---------------------------------------------------------------------------------------------
# where a tensor's bytes are

@dataclass(frozen=True)
class FileSlice:
    source: object  # FileHandle or MappedSource
    offset: int


class MappedSource:
    """Reads a tensor by copying from its own view of a file mapping (case 3 of the module doc)."""

    path = "a file ComfyUI mapped"

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.reshape(-1).view(torch.uint8)

    def read_into(self, dst: torch.Tensor, offset: int) -> None:
        dst.copy_(self.tensor[offset:offset + dst.numel()])

    def problem(self) -> Optional[str]:
        return None


def tag_storage(t: torch.Tensor, handle: FileHandle, storage_offset_in_file: int) -> None:
    """Record that ``t``'s storage holds the bytes of ``handle``'s file from ``storage_offset_in_file``."""
    setattr(t.untyped_storage(), TAG, (handle, storage_offset_in_file))


def map_file(handle: FileHandle, offset: int, nbytes: int) -> torch.Tensor:
    """A read-only uint8 view of ``nbytes`` of ``handle``'s file from ``offset`` (memory-mapped, tagged
    as a slice of that file). Nothing is read until something touches the pages."""
    start = offset - offset % _GRANULE
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    mm = mmap.mmap(handle._f.fileno(), offset + nbytes - start, offset=start, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        # a read-only mapping: nothing in the pack writes a master in place (LoRA patches the slot)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        base = torch.frombuffer(mm, dtype=torch.uint8)
    tag_storage(base, handle, start)
    return base[offset - start:]


class _Mappings:
    """This process' file mappings (Linux ``/proc/self/smaps``), read once per packing: (start, end,
    file offset, path, device, inode, usable). ``usable``: the mapped bytes are the file's (read-only,
    shared, or private without a page of its own). Empty where the OS has no such file."""

    _LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$")

    def __init__(self):
        self.maps: List[Tuple[int, int, int, str, int, int, bool]] = []
        try:
            with open("/proc/self/smaps", "r", errors="replace") as f:
                text = f.read()
        except OSError:
            return
        current = None
        for line in text.splitlines():
            m = self._LINE.match(line)
            if m:
                if current is not None:
                    self.maps.append(tuple(current))
                start, end, perms, off, major, minor, inode, path = m.groups()
                usable = "w" not in perms or perms[3] == "s"  # read-only or shared: the file's bytes
                current = [int(start, 16), int(end, 16), int(off, 16), path, os.makedev(int(major, 16), int(minor, 16)),
                           int(inode), usable, perms[3] == "p" and "w" in perms]
                continue
            if current is not None and line.startswith("Anonymous:") and current[7]:
                current[6] = line.split()[1] == "0"  # a private writable mapping: unmodified pages only
        if current is not None:
            self.maps.append(tuple(current))
        self.maps.sort()
        self._starts = [m[0] for m in self.maps]

    def find(self, ptr: int, nbytes: int) -> Optional[Tuple[str, int, int, int]]:
        """(path, file offset, device, inode) of ``ptr`` when ``nbytes`` from it lie in one usable
        file mapping."""
        import bisect

        if not self.maps:
            return None
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            return None
        start, end, off, path, dev, ino, usable = self.maps[i][:7]
        if not usable or not path.startswith("/") or path.endswith(" (deleted)") or ptr + nbytes > end or not ino:
            return None
        return path, off + ptr - start, dev, ino


class SliceFinder:
    """:func:`file_slice` for many tensors with one look at the process' mappings, and one open
    handle per file."""

    def __init__(self):
        self._mappings: Optional[_Mappings] = None
        self._handles: Dict[Tuple[int, int], FileHandle] = {}

    def find(self, t: torch.Tensor):
        """A :class:`FileSlice` (or a :class:`MappedSource` slice) holding ``t``'s bytes, or None."""
        if t.device.type != "cpu" or not t.is_contiguous() or tensor_bytes(t) == 0:
            return None
        storage = t.untyped_storage()
        ptr = t.data_ptr()
        tag = getattr(storage, TAG, None)
        if tag is not None:
            handle, base = tag
            return FileSlice(handle, base + ptr - storage.data_ptr())
        if self._mappings is None:
            self._mappings = _Mappings()
        found = self._mappings.find(ptr, tensor_bytes(t))
        if found is not None:
            path, offset, dev, ino = found
            handle = self._handle(path, dev, ino)
            if handle is not None:
                return FileSlice(handle, offset)
        if getattr(storage, "_comfy_tensor_file_slice", None) is not None:
            return FileSlice(MappedSource(t), 0)
        return None

    def _handle(self, path: str, dev: int, ino: int) -> Optional[FileHandle]:
        handle = self._handles.get((dev, ino))
        if handle is None:
            try:
                handle = FileHandle(path)
            except OSError:
                return None
            if handle.identity[:2] != (dev, ino):  # the name now names another file
                handle.close()
                return None
            self._handles[(dev, ino)] = handle
        return handle


# ---------------------------------------------------------------------------------------------
# spill files

def spill_path(folder: str) -> str:
    return os.path.join(folder, f"{SPILL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}.bin")


def remove_stale_spill_files(folder: str) -> List[str]:
    """Delete spill files in ``folder`` left by processes that no longer run (a killed ComfyUI), and
    nothing else: only names this pack writes, only for process ids that are gone. Returns them."""
    import psutil

    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _SPILL_NAME.match(name)
        if m is None or int(m.group(1)) == os.getpid() or psutil.pid_exists(int(m.group(1))):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError as e:
            log.warning("block swap: could not remove the stale spill file %s (%s)", name, e)
    if removed:
        log.info("block swap: removed %d stale spill file(s) in %s", len(removed), folder)
    return removed


_CLEANED: set = set()  # folders checked for stale spill files in this process


class SpillFile:
    """One file in ``folder`` that units without a file of their own are written to, once, and read
    from. Created on first use; on POSIX its name is removed at once (the open file and its mappings
    keep the data until the model is freed, and a killed process leaves nothing); where a file in use
    cannot be unlinked (Windows) it is deleted when freed, and :func:`remove_stale_spill_files` removes
    what a killed process left the next time the folder is used."""

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        self.handle: Optional[FileHandle] = None
        self.size = 0  # bytes written (the end of the last region)
        self._path: Optional[str] = None

    def _open(self) -> FileHandle:
        if self.handle is None:
            if self.folder not in _CLEANED:
                _CLEANED.add(self.folder)
                remove_stale_spill_files(self.folder)
            path = spill_path(self.folder)
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            except OSError as e:
                raise SpillError(f"block swap cannot write its spill file in {self.folder} ({e}); choose a "
                                 "writable spill_folder, or set host_memory to RAM.") from e
            f = os.fdopen(fd, "r+b", buffering=0)
            self.handle = FileHandle(path, f, spill=True)
            try:
                os.unlink(path)  # POSIX: nameless from now on
            except OSError:  # Windows: an open file keeps its name; delete it when freed
                self._path = path
                weakref.finalize(self, _remove_quietly, f, path)
        return self.handle

    def check_space(self, nbytes: int, regions: int) -> None:
        """Refuse early, naming the folder, when it has less free space than ``nbytes`` written in up to
        ``regions`` regions need (each region starts at a mapping granule: :data:`REGION_PAD` more each)."""
        import shutil

        nbytes += regions * REGION_PAD
        try:
            os.makedirs(self.folder, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
        except OSError as e:
            raise SpillError(f"block swap cannot use the spill folder {self.folder} ({e}); choose a writable "
                             "spill_folder, or set host_memory to RAM.") from e
        if nbytes > free:
            raise SpillError(f"block swap needs {format_bytes(nbytes)} in the spill folder {self.folder}, but only "
                             f"{format_bytes(free)} is free; free some disk space, choose another spill_folder, "
                             "or set host_memory to RAM.")

    def reserve(self, nbytes: int) -> Tuple[int, torch.Tensor]:
        """A new region of ``nbytes`` (zeros until written): its file offset, and the region mapped
        read-only (uint8, tagged as a slice of this file; it shows what :meth:`write_at` writes)."""
        start = self._extend(nbytes)
        return start, map_file(self.handle, start, nbytes)

    def _extend(self, nbytes: int) -> int:
        """Make room for a region of ``nbytes`` at the next mapping granule; its file offset."""
        handle = self._open()
        start = _round_up(self.size, _GRANULE)
        try:
            handle._f.truncate(start + nbytes)
        except OSError as e:
            raise self._failed(nbytes, e) from e
        self.size = start + nbytes
        return start

    def write_at(self, offset: int, t: torch.Tensor) -> None:
        """Write ``t``'s bytes (contiguous) at ``offset`` of the file (inside a reserved region)."""
        data = t.detach().reshape(-1).view(torch.uint8)
        if data.device.type != "cpu":
            data = data.cpu()
        view = memoryview(data.numpy())
        f = self.handle._f
        try:
            f.seek(offset)
            done = 0
            while done < len(view):
                done += f.write(view[done:])
        except OSError as e:
            raise self._failed(len(view), e) from e

    def write(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int], nbytes: int) -> Tuple[int, torch.Tensor]:
        """A region of ``nbytes`` holding ``tensors`` at ``offsets``: its file offset and its read-only
        mapping. On failure the file is cut back to where it was: no partial region is left."""
        before = self.size
        start = self._extend(nbytes)
        try:
            for t, off in zip(tensors, offsets):
                self.write_at(start + off, t)
        except SpillError:
            self.cut(before)  # nothing maps the region yet: it can go
            raise
        return start, map_file(self.handle, start, nbytes)

    def cut(self, size: int) -> None:
        """Drop everything after ``size`` bytes (regions whose mappings are gone)."""
        try:
            self.handle._f.truncate(size)
            self.size = size
        except OSError:
            log.warning("block swap: could not cut back the spill file in %s after a failed write", self.folder)

    def _failed(self, nbytes: int, e: OSError) -> SpillError:
        return SpillError(f"block swap could not write {format_bytes(nbytes)} to its spill file in {self.folder} "
                          f"({e}); free some disk space, choose another spill_folder, or set host_memory to RAM.")


def _remove_quietly(f, path: str) -> None:  # pragma: no cover - Windows
    try:
        f.close()
        os.remove(path)
    except OSError:
        log.debug("block swap: spill file %s stays until the next start (still mapped)", path)


# ---------------------------------------------------------------------------------------------
# a unit's reads

@dataclass(frozen=True)
class Read:
    source: object  # FileHandle or MappedSource
    offset: int  # in the source
    nbytes: int
    dst: int  # offset in the unit's slot layout


def merge_reads(reads: Sequence[Read], max_gap: int = 4096) -> Tuple[Read, ...]:
    """``reads`` grouped by file, in file order (sequential reads are what disks are fast at), with
    neighbours merged into one read where the file and the slot layout space them alike (a spilled
    unit, tensors stored back to back): a gap of at most ``max_gap`` bytes is read along."""
    ids: Dict[int, int] = {}
    for r in reads:
        ids.setdefault(id(r.source), len(ids))
    out: List[Read] = []
    for r in sorted(reads, key=lambda r: (ids[id(r.source)], r.offset)):
        last = out[-1] if out else None
        if (last is not None and last.source is r.source and 0 <= r.offset - (last.offset + last.nbytes) <= max_gap
                and r.offset - last.offset == r.dst - last.dst):
            out[-1] = Read(last.source, last.offset, r.offset + r.nbytes - last.offset, last.dst)
        else:
            out.append(r)
    return tuple(out)


def sources(reads: Sequence[Read]) -> List[object]:
    return list({id(r.source): r.source for r in reads}.values())


def files_of(reads: Sequence[Read]) -> List[str]:
    return sorted({r.source.path for r in reads if isinstance(r.source, FileHandle) and not r.source.spill})


__all__ = ["FileHandle", "FileReadError", "FileSlice", "MappedSource", "Read", "SliceFinder", "SpillError",
           "SpillFile", "map_file", "merge_reads", "remove_stale_spill_files", "tag_storage", "files_of",
           "sources"]
